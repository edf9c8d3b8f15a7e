"""AdaGC (``thresholds.EMARatio``, ``adagc``) against float64 NumPy models of AdaGC and of OLMo.

The models below are written from the equations (AdaGC: Wang et al. 2025, Algorithm 1 and the
notes; OLMo: ``olmo/optim.py``, ``_do_adaptive_clipping``), not from clipchain: each group's norm,
a warmup with a global clip and a running minimum, then a clip at ``ratio * gamma`` and an EMA of
the clipped norm. Sequences carry spikes of 10x-100x and non-finite steps.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from harness import (
  as_tree,
  at,
  flat,
  loop,
  map_shapes,
  orbax_round_trip,
  scan,
  shape_of,
  stack,
  stacked,
  unstack,
)

import clipchain
from clipchain.granularity import Layer, Unit
from clipchain.thresholds import EMARatio

SHAPES = {
  "Dense_0": {"kernel": (6, 8), "bias": (8,)},
  "Dense_1": {"kernel": (8, 4), "bias": (4,)},
  "norm": {"scale": (5,)},
}
PATHS = ("Dense_0/bias", "Dense_0/kernel", "Dense_1/bias", "Dense_1/kernel", "norm/scale")
RTOL = 1e-5


# Sequences: lists of {path: float64 array holding float32 values}.


def make_sequence(steps, seed, *, spikes=(), nonfinite=(), scale=0.1, zero=()):
  """Random gradients drifting slowly; ``spikes``: ``(step, paths, factor)``; ``nonfinite``:
  ``(step, path, value)``; ``zero``: ``(steps, path)``, that leaf is 0 at those steps."""
  rng = np.random.default_rng(seed)
  base = {p: scale * 10 ** rng.uniform(-0.5, 0.5) for p in PATHS}
  seq = []
  for t in range(steps):
    drift = 1.0 + 0.5 * math.sin(t / 15.0)
    seq.append({p: base[p] * drift * rng.normal(size=shape_of(SHAPES, p)) for p in PATHS})
  for t, paths, factor in spikes:
    for p in paths:
      seq[t][p] = seq[t][p] * factor
  for zero_steps, p in zero:
    for t in zero_steps:
      seq[t][p] = np.zeros(shape_of(SHAPES, p))
  for t, p, value in nonfinite:
    seq[t][p] = seq[t][p].copy()
    seq[t][p].flat[0] = value
  return [{p: g[p].astype(np.float32).astype(np.float64) for p in PATHS} for g in seq]


def run(tx, seq):
  """Every step's updates, reported thresholds and policy states."""
  final, updates, states = scan(tx, stacked(seq))
  return final, flat(updates), np.asarray(states.threshold), states.policy_state


# The float64 model of AdaGC.


def adagc_reference(seq, *, ratio, beta, warmup_steps, warmup_max_norm, eps, groups):
  """AdaGC step by step. ``groups``: ``{group: [paths]}``. Returns per step the clipped
  gradients (``None`` at a non-finite step), ``{group: threshold}`` and ``{group: gamma}``.

  gamma's EMA takes the norm of the clipped gradient (Algorithm 1's ``||g_hat||``), which is
  ``min(n, ratio * gamma)`` up to the ``eps`` in the scale."""
  gamma = dict.fromkeys(groups, math.inf)
  outs, limits, gammas = [], [], []
  for t, g in enumerate(seq):
    norm = {k: math.sqrt(sum(np.sum(g[p] ** 2) for p in ps)) for k, ps in groups.items()}
    if not all(math.isfinite(n) for n in norm.values()):
      # The step counts, but nothing enters gamma.
      outs.append(None)
      limits.append(None)
      gammas.append(dict(gamma))
      continue
    scale, limit = {}, {}
    if t < warmup_steps:
      total = math.sqrt(sum(n**2 for n in norm.values()))
      for k, n in norm.items():
        if warmup_max_norm is None:
          scale[k], limit[k] = 1.0, math.inf
        else:
          scale[k] = min(1.0, warmup_max_norm / (total + eps))
          limit[k] = n * warmup_max_norm / (total + eps)
        gamma[k] = min(gamma[k], n * scale[k])
    else:
      for k, n in norm.items():
        c = ratio * gamma[k]
        scale[k] = c / (n + eps) if n > c else 1.0
        # A clipped group reports the norm it was clipped to: c up to eps / n.
        limit[k] = c if n <= c else n * scale[k]
        gamma[k] = beta * gamma[k] + (1 - beta) * n * scale[k]  # the clipped norm
    outs.append({p: g[p] * scale[k] for k, ps in groups.items() for p in ps})
    limits.append(limit)
    gammas.append(dict(gamma))
  return outs, limits, gammas


def per_leaf(paths=PATHS):
  return {p: [p] for p in paths}


def check_against(seq, reference, updates, thresholds, gammas, groups):
  outs, limits, ref_gammas = reference
  names = list(groups)
  for t in range(len(seq)):
    np.testing.assert_allclose(
      np.atleast_1d(gammas[t]), [ref_gammas[t][k] for k in names], rtol=RTOL, err_msg=f"step {t}"
    )
    if outs[t] is None:
      continue
    for p in PATHS:
      np.testing.assert_allclose(
        updates[p][t], outs[t][p], rtol=RTOL, atol=1e-7, err_msg=f"step {t} {p}"
      )
    np.testing.assert_allclose(
      np.atleast_1d(thresholds[t]),
      [limits[t][k] for k in names],
      rtol=RTOL,
      err_msg=f"step {t}",
    )


SPIKES = [
  (40, PATHS, 30.0),  # during the default warmup: the global clip
  (108, ("Dense_0/kernel",), 50.0),
  (135, ("Dense_1/bias", "norm/scale"), 100.0),
  (150, PATHS, 10.0),
]
NONFINITE = [(125, "Dense_1/kernel", np.nan), (160, "Dense_0/bias", np.inf)]


def test_adagc_defaults_match_the_float64_model_step_by_step():
  seq = make_sequence(170, seed=0, spikes=SPIKES, nonfinite=NONFINITE, scale=0.1)
  tx = clipchain.adagc()
  final, updates, thresholds, policy = run(tx, seq)
  assert final.layer_names == PATHS
  reference = adagc_reference(
    seq, ratio=1.04, beta=0.99, warmup_steps=100, warmup_max_norm=1.0, eps=1e-6, groups=per_leaf()
  )
  check_against(seq, reference, updates, thresholds, np.asarray(policy.gamma), per_leaf())
  # The sequence exercises every branch: clipped and unclipped steps in and after the warmup.
  outs = reference[0]

  def clipped_steps(path, steps):
    return [t for t in steps if outs[t] and not np.allclose(outs[t][path], seq[t][path])]

  assert 0 < len(clipped_steps("Dense_0/kernel", range(100))) < 100
  assert 40 in clipped_steps("Dense_0/kernel", range(100))
  assert 0 < len(clipped_steps("norm/scale", range(100, 170))) < 70
  # The spiked layer is cut back to ratio * gamma.
  assert (
    np.linalg.norm(updates["Dense_0/kernel"][108]) < np.linalg.norm(seq[108]["Dense_0/kernel"]) / 10
  )
  np.testing.assert_allclose(
    np.linalg.norm(updates["Dense_0/kernel"][108]),
    1.04 * policy.gamma[107][PATHS.index("Dense_0/kernel")],
    rtol=RTOL,
  )


@pytest.mark.parametrize(
  "config",
  [
    dict(ratio=1.5, beta=0.9, warmup_steps=10, warmup_max_norm=None, eps=0.0),
    dict(ratio=1.2, beta=0.95, warmup_steps=25, warmup_max_norm=0.3, eps=1e-6),
  ],
  ids=["no-warmup-clip", "warmup-clip"],
)
def test_per_layer_policy_matches_the_model_with_module_layers(config):
  seq = make_sequence(
    150,
    seed=1,
    spikes=[(5, PATHS, 20.0), (60, ("norm/scale",), 80.0)],
    nonfinite=[(30, "norm/scale", np.nan)],
  )
  groups = {
    "Dense_0": ["Dense_0/bias", "Dense_0/kernel"],
    "Dense_1": ["Dense_1/bias", "Dense_1/kernel"],
    "norm": ["norm/scale"],
  }
  tx = clipchain.clip_norm(EMARatio(**config), granularity=Layer("module"), name="adagc")
  final, updates, thresholds, policy = run(tx, seq)
  assert final.layer_names == tuple(groups)
  reference = adagc_reference(seq, groups=groups, **config)
  check_against(seq, reference, updates, thresholds, np.asarray(policy.gamma), groups)


def test_global_adagc_matches_the_single_group_model():
  config = dict(ratio=1.1, beta=0.98, warmup_steps=20, warmup_max_norm=0.5, eps=1e-6)
  seq = make_sequence(170, seed=2, spikes=SPIKES, nonfinite=NONFINITE)
  tx = clipchain.clip_norm(EMARatio(**config), granularity="global", name="global_adagc")
  final, updates, thresholds, policy = run(tx, seq)
  groups = {"all": list(PATHS)}
  reference = adagc_reference(seq, groups=groups, **config)
  check_against(seq, reference, updates, thresholds, np.asarray(policy.gamma), groups)
  assert final.policy_state.gamma.shape == ()
  assert float(clipchain.stats(final)["global_adagc/gamma"]) == pytest.approx(
    reference[2][-1]["all"], rel=RTOL
  )


def test_warmup_clips_the_global_norm_and_keeps_the_running_minimum_of_clipped_norms():
  policy = EMARatio(ratio=2.0, beta=0.5, warmup_steps=3, warmup_max_norm=1.0, eps=0.0)
  tx = clipchain.clip_norm(policy, granularity="layer")
  grads = [
    {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.0])},  # global norm 5: scaled by 1/5
    {"a": jnp.array([0.3, 0.4]), "b": jnp.array([0.1])},  # below 1: unclipped
    {"a": jnp.array([6.0, 8.0]), "b": jnp.array([0.0])},  # scaled by 1/10
  ]
  outputs, states = loop(tx.update, tx.init(grads[0]), grads)
  state = states[-1]
  np.testing.assert_allclose(outputs[0]["a"], [0.6, 0.8], rtol=RTOL)
  np.testing.assert_allclose(outputs[1]["a"], [0.3, 0.4], rtol=RTOL)
  np.testing.assert_allclose(outputs[2]["a"], [0.6, 0.8], rtol=RTOL)
  # gamma_a = min(1, 0.5, 1); gamma_b = min(inf, 0.1): zero norms do not enter the minimum.
  np.testing.assert_allclose(state.policy_state.gamma, [0.5, 0.1], rtol=RTOL)
  # After the warmup: clip to 2 * gamma, then the EMA of the clipped norm.
  updates, state = tx.update({"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.15])}, state)
  np.testing.assert_allclose(updates["a"], [0.6, 0.8], rtol=RTOL)
  np.testing.assert_allclose(updates["b"], [0.15], rtol=RTOL)
  np.testing.assert_allclose(state.threshold, [1.0, 0.2], rtol=RTOL)
  np.testing.assert_allclose(state.policy_state.gamma, [0.75, 0.125], rtol=RTOL)


def test_no_warmup_clip_leaves_the_warmup_unclipped():
  policy = EMARatio(warmup_steps=2, warmup_max_norm=None)
  tx = clipchain.clip_norm(policy, granularity="layer")
  g = {"a": jnp.array([300.0, 400.0])}
  updates, state = tx.update(g, tx.init(g))
  np.testing.assert_array_equal(updates["a"], g["a"])
  assert np.isinf(state.threshold).all()
  np.testing.assert_allclose(state.policy_state.gamma, [500.0])


# A layer with a zero gradient.


def test_zero_gradient_layer_is_never_frozen_and_never_nan():
  warmup = 10
  zero_steps = [*range(warmup + 3), 30, 31, 32]
  seq = make_sequence(60, seed=3, zero=[(zero_steps, "norm/scale"), ([4], "Dense_1/bias")])
  tx = clipchain.clip_norm(
    EMARatio(ratio=1.3, beta=0.9, warmup_steps=warmup, warmup_max_norm=0.5), granularity="layer"
  )
  _, updates, thresholds, policy = run(tx, seq)
  gamma = np.asarray(policy.gamma)
  i, j = PATHS.index("norm/scale"), PATHS.index("Dense_1/bias")
  for values in (*updates.values(), thresholds, gamma):
    assert not np.isnan(values).any()
  # Zero all through the warmup and after it: no reference norm, no limit.
  assert np.isinf(gamma[: warmup + 3, i]).all()
  assert np.isinf(thresholds[warmup : warmup + 3, i]).all()
  # Its first nonzero norm passes unclipped and starts the EMA...
  first = warmup + 3
  np.testing.assert_array_equal(updates["norm/scale"][first], seq[first]["norm/scale"])
  np.testing.assert_allclose(gamma[first, i], np.linalg.norm(seq[first]["norm/scale"]), rtol=RTOL)
  # ... which then clips it like any other layer, and zero steps leave gamma where it was.
  np.testing.assert_allclose(thresholds[first + 1, i], 1.3 * gamma[first, i], rtol=RTOL)
  np.testing.assert_array_equal(gamma[30:33, i], gamma[29, i])
  assert np.isfinite(gamma[33:, i]).all() and (gamma[33:, i] > 0).all()
  # A zero norm in one warmup step does not pull the running minimum to 0.
  assert gamma[4, j] == gamma[3, j] > 0
  assert (gamma[warmup:, j] > 0).all()


def test_non_finite_steps_leave_gamma_unchanged():
  seq = make_sequence(
    30, seed=4, nonfinite=[(12, "Dense_0/kernel", np.nan), (20, "norm/scale", -np.inf)]
  )
  tx = clipchain.clip_norm(EMARatio(warmup_steps=5), granularity="layer")
  final, updates, _, policy = run(tx, seq)
  gamma = np.asarray(policy.gamma)
  for t in (12, 20):
    np.testing.assert_array_equal(gamma[t], gamma[t - 1])
    assert not np.array_equal(gamma[t + 1], gamma[t])
  assert np.isnan(updates["Dense_0/kernel"][12]).any()
  assert int(final.count) == 30


# OLMo's max_grad_norm_ratio.


def olmo_reference(seq, *, ratio, beta, store_first_step=True, warmup=None):
  """``_do_adaptive_clipping`` per parameter tensor. OLMo's own code does not store the average
  at global step 1 (``store_first_step=False``); ``warmup=(k, f)`` multiplies ``ratio`` by ``f``
  while ``step <= k``, as OLMo's scheduler with ``grad_clip_warmup_steps/factor``."""
  exp_avg = {}
  outs, averages = [], []
  for step, g in enumerate(seq, start=1):
    r = ratio
    if warmup is not None and step <= warmup[0]:
      r = warmup[1] * ratio
    out = {}
    for p in PATHS:
      norm = float(np.linalg.norm(g[p]))
      e = exp_avg.get(p)
      store = e is not None or store_first_step or step > 1
      if e is None:
        e = norm
      coef = min(r * e / (norm + 1e-6), 1.0)
      out[p] = g[p] * coef
      e = e + (1 - beta) * (norm * coef - e)  # torch.lerp_
      if store:
        exp_avg[p] = e
    outs.append(out)
    averages.append([exp_avg.get(p, math.nan) for p in PATHS])
  return outs, averages


OLMO_SPIKES = [(30, ("Dense_0/kernel",), 40.0), (45, PATHS, 15.0), (70, ("norm/scale",), 100.0)]


@pytest.mark.parametrize("warmup", [None, (20, 5.0)], ids=["constant", "clip-warmup"])
def test_olmo_ratio_clipping_is_emaratio_with_one_unclipped_warmup_step(warmup):
  ratio, beta = 1.3, 0.95
  seq = make_sequence(100, seed=5, spikes=OLMO_SPIKES)
  if warmup is None:
    schedule = ratio
  else:
    k, f = warmup
    schedule = lambda count: jnp.where(count < k, f * ratio, ratio)
  policy = EMARatio(ratio=schedule, beta=beta, warmup_steps=1, warmup_max_norm=None, eps=1e-6)
  tx = clipchain.clip_norm(policy, granularity="layer", name="olmo")
  _, updates, _, state = run(tx, seq)
  outs, averages = olmo_reference(seq, ratio=ratio, beta=beta, warmup=warmup)
  for t in range(len(seq)):
    for p in PATHS:
      np.testing.assert_allclose(
        updates[p][t], outs[t][p], rtol=RTOL, atol=1e-7, err_msg=f"{t} {p}"
      )
  np.testing.assert_allclose(np.asarray(state.gamma), averages, rtol=RTOL)
  clipped = sum(not np.allclose(o[p], g[p]) for o, g in zip(outs, seq) for p in PATHS)
  assert clipped > 10


def test_olmo_code_restarts_its_average_at_the_second_step():
  """OLMo stores the average only from global step 2: its first two steps are unclipped and the
  rest is EMARatio started at the second step."""
  ratio, beta = 1.3, 0.95
  seq = make_sequence(80, seed=6, spikes=OLMO_SPIKES[:2])
  outs, _ = olmo_reference(seq, ratio=ratio, beta=beta, store_first_step=False)
  policy = EMARatio(ratio=ratio, beta=beta, warmup_steps=1, warmup_max_norm=None)
  _, updates, _, _ = run(clipchain.clip_norm(policy, granularity="layer"), seq[1:])
  for p in PATHS:
    np.testing.assert_allclose(outs[0][p], seq[0][p])
    for t in range(1, len(seq)):
      np.testing.assert_allclose(updates[p][t - 1], outs[t][p], rtol=RTOL, atol=1e-7)


# Units: one gamma per output unit, the same as one layer per column.


def test_unit_granularity_is_layer_granularity_over_columns():
  rng = np.random.default_rng(7)
  steps = 60
  kernels = rng.normal(size=(steps, 5, 3)) * np.array([0.1, 1.0, 10.0])
  kernels[40] *= 50.0
  kernels = jnp.asarray(kernels, jnp.float32)
  policy = EMARatio(ratio=1.2, beta=0.9, warmup_steps=8, warmup_max_norm=2.0)
  unit_tx = clipchain.clip_norm(policy, granularity=Unit())
  layer_tx = clipchain.clip_norm(policy, granularity="layer")
  unit_state, unit_updates, _ = scan(unit_tx, {"w": kernels})
  columns = {f"c{i}": kernels[:, :, i] for i in range(3)}
  layer_state, layer_updates, _ = scan(layer_tx, columns)
  np.testing.assert_allclose(
    unit_updates["w"],
    jnp.stack([layer_updates[f"c{i}"] for i in range(3)], -1),
    rtol=RTOL,
    atol=1e-7,
  )
  gamma = unit_state.policy_state.gamma["w"]
  np.testing.assert_allclose(gamma[0], layer_state.policy_state.gamma, rtol=RTOL)
  report = clipchain.stats(unit_state)
  np.testing.assert_allclose(report["clip_norm/gamma"], np.mean(gamma), rtol=RTOL)
  assert not np.allclose(unit_updates["w"][40], kernels[40])


# jit, vmap, scan, dtypes, checkpoints, statistics.


def test_scan_vmap_and_a_python_loop_agree():
  seq = make_sequence(40, seed=8, spikes=[(25, PATHS, 30.0)])
  tx = clipchain.adagc(warmup_steps=10)
  _, scanned, _, scanned_policy = run(tx, seq)
  update = jax.jit(tx.update)
  looped, states = loop(update, tx.init(map_shapes(jnp.zeros, SHAPES)), map(as_tree, seq))
  for t, updates in enumerate(looped):
    for p in PATHS:
      np.testing.assert_allclose(flat(updates)[p], scanned[p][t], rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(states[-1].policy_state.gamma, scanned_policy.gamma[-1], rtol=1e-6)
  assert update._cache_size() == 1

  others = [make_sequence(40, seed=s, spikes=[(30, PATHS, 50.0)]) for s in (9, 10)]
  batch = stack([stacked(s) for s in (seq, *others)], axis=1)
  vupdate = jax.jit(jax.vmap(tx.update))
  outputs, states = loop(vupdate, jax.vmap(tx.init)(at(batch, 0)), unstack(batch))
  outputs = [flat(updates) for updates in outputs]
  for b, s in enumerate((seq, *others)):
    _, alone, _, policy = run(tx, s)
    for p in PATHS:
      np.testing.assert_allclose(
        np.stack([o[p][b] for o in outputs]), alone[p], rtol=1e-6, atol=1e-8
      )
    np.testing.assert_allclose(states[-1].policy_state.gamma[b], policy.gamma[-1], rtol=1e-6)


def test_bfloat16_updates_keep_their_dtype():
  g = {"a": jnp.array([3.0, 4.0], jnp.bfloat16), "b": jnp.array([1.0], jnp.bfloat16)}
  tx = clipchain.adagc(warmup_steps=1)
  state = tx.init(g)
  _, state = tx.update(g, state)
  updates, state = tx.update(jax.tree.map(lambda x: 10 * x, g), state)
  chex.assert_trees_all_equal_dtypes(updates, g)
  assert state.policy_state.gamma.dtype == jnp.float32
  # gamma_a is the norm of "a" after the first step's global clip: 5 / sqrt(26).
  expected = np.array([30.0, 40.0]) / 50.0 * 1.04 * 5.0 / math.sqrt(26.0)
  np.testing.assert_allclose(np.asarray(updates["a"], np.float32), expected, rtol=1e-2)


def test_orbax_restores_infinite_and_finite_gamma_bit_exactly(tmp_path):
  seq = make_sequence(20, seed=11, zero=[(range(20), "norm/scale")])
  tx = optax.chain(clipchain.adagc(warmup_steps=5), optax.adam(1e-3))
  params = map_shapes(jnp.zeros, SHAPES)
  update = jax.jit(tx.update)
  grads = [as_tree(g) for g in seq]
  _, states = loop(update, tx.init(params), grads[:8], params)
  state = states[-1]
  gamma = state[0].policy_state.gamma
  assert np.isinf(gamma[PATHS.index("norm/scale")]) and np.isfinite(gamma[0])
  restored = orbax_round_trip(tmp_path / "state", state)
  chex.assert_trees_all_equal(restored, state)
  assert type(restored[0].policy_state) is type(state[0].policy_state)
  # Training on from the restored state repeats, bit for bit, training on from the saved one.
  ua, a = loop(update, state, grads[8:], params)
  ub, b = loop(update, restored, grads[8:], params)
  chex.assert_trees_all_equal(ua, ub)
  chex.assert_trees_all_equal(a[-1], b[-1])


def test_stats_report_gamma_per_layer():
  seq = make_sequence(12, seed=12)
  final, _, _, _ = run(clipchain.adagc(warmup_steps=4, name="ada"), seq)
  stats = clipchain.stats(final)
  for i, p in enumerate(PATHS):
    assert stats[f"ada/gamma/{p}"] == final.policy_state.gamma[i]
    assert f"ada/threshold/{p}" in stats and f"ada/norm/{p}" in stats
  assert all(np.isfinite(v).all() for v in stats.values())


# Validation.


@pytest.mark.parametrize(
  "kwargs, argname",
  [
    (dict(ratio=0.9), "ratio"),
    (dict(ratio=math.nan), "ratio"),
    (dict(ratio=math.inf), "ratio"),
    (dict(beta=1.0), "beta"),
    (dict(beta=-0.1), "beta"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(warmup_steps=2.5), "warmup_steps"),  # TypeError: not an integer
    (dict(warmup_max_norm=-1.0), "warmup_max_norm"),
    (dict(warmup_max_norm=math.inf), "warmup_max_norm"),
    (dict(eps=-1e-6), "eps"),
  ],
)
def test_invalid_hyperparameters_are_refused(kwargs, argname):
  error = TypeError if isinstance(kwargs.get("warmup_steps"), float) else ValueError
  with pytest.raises(error, match=argname):
    clipchain.adagc(**kwargs)
  with pytest.raises(error, match=argname):
    EMARatio(**kwargs)


def test_element_granularity_is_refused_with_a_reason():
  with pytest.raises(ValueError, match=r"Element\(\).*SecondMoment"):
    clipchain.clip_norm(EMARatio(), granularity="element")
  with pytest.raises(ValueError, match=r"every value is its own group"):
    clipchain.adagc(granularity="element")
  for granularity in ("global", "layer", "unit"):
    clipchain.clip_norm(EMARatio(), granularity=granularity)


def test_preset_name_and_layers():
  params = {"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
  tx = clipchain.adagc(granularity=clipchain.granularity.Layer("module"), name="mine")
  state = tx.init(params)
  assert state.name == "mine" and state.layer_names == ("Dense_0",)
  with pytest.raises(ValueError, match="name"):
    clipchain.adagc(name="")

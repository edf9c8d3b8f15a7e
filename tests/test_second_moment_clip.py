"""``clip_by_second_moment`` against a float64 NumPy StableAdamW written from the paper.

Wortsman et al. 2023, "Stable and low-precision training for large-scale vision-language models",
Algorithm 2 (StableAdamW): with ``v̂`` the bias-corrected second moment after this step,
``u = sqrt(mean(g² / max(v̂, eps²)))`` per tensor, and the step (Adam's, weight decay included) is
taken with the learning rate divided by ``max(1, u)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from harness import orbax_round_trip

import clipchain
from clipchain._src.norms import unshared

SHAPES = {"kernel": (4, 3), "bias": (3,), "scale": ()}
LR, B1, B2, ADAM_EPS, WD, CLIP_EPS = 0.01, 0.9, 0.95, 1e-8, 0.1, 1e-6


def gradient_sequence(steps: int = 30, seed: int = 0):
  """Gaussian gradients with a 50x spike at step 12 in the kernel and one at 20 in the bias."""
  rng = np.random.default_rng(seed)
  seq = []
  for t in range(steps):
    g = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    if t == 12:
      g["kernel"] = g["kernel"] * 50.0
    if t == 20:
      g["bias"] = g["bias"] * 50.0
    seq.append(g)
  return seq


def stable_adamw_numpy(params, grads_seq, *, granularity="layer"):
  """Float64 StableAdamW: returns the params after every step and each step's per-tensor RMS."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  history, rms_history = [], []
  for t, g in enumerate(grads_seq, start=1):
    rms = {}
    for k in p:
      m[k] = B1 * m[k] + (1 - B1) * g[k]
      v[k] = B2 * v[k] + (1 - B2) * g[k] ** 2
    v_hat = {k: v[k] / (1 - B2**t) for k in p}
    ratio = {k: g[k] ** 2 / np.maximum(v_hat[k], CLIP_EPS**2) for k in p}
    if granularity == "layer":
      rms = {k: np.sqrt(np.mean(ratio[k])) for k in p}
    else:
      total = np.sqrt(sum(np.sum(r) for r in ratio.values()) / sum(r.size for r in ratio.values()))
      rms = {k: total for k in p}
    for k in p:
      lr = LR / max(1.0, rms[k])
      m_hat = m[k] / (1 - B1**t)
      p[k] = p[k] - lr * (m_hat / (np.sqrt(v_hat[k]) + ADAM_EPS) + WD * p[k])
    history.append({k: x.copy() for k, x in p.items()})
    rms_history.append(rms)
  return history, rms_history


def _f32(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _run(tx, params, grads_seq):
  state = tx.init(params)

  @jax.jit
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  history, stats = [], []
  for g in grads_seq:
    params, state = step(params, state, _f32(g))
    history.append(params)
    stats.append(clipchain.stats(state))
  return history, stats, state


@pytest.mark.parametrize("granularity", ["layer", "global"])
def test_matches_stable_adamw_from_the_paper(granularity):
  params = _f32({k: np.full(s, 0.5) for k, s in SHAPES.items()})
  seq = gradient_sequence()
  tx = clipchain.clip_by_second_moment(
    optax.adamw(LR, b1=B1, b2=B2, eps=ADAM_EPS, weight_decay=WD),
    b2=B2,
    eps=CLIP_EPS,
    granularity=granularity,
  )
  ours, stats, _ = _run(tx, params, seq)
  reference, rms = stable_adamw_numpy(params, seq, granularity=granularity)
  for t, (got, want) in enumerate(zip(ours, reference)):
    for k in SHAPES:
      np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-6, err_msg=f"{t}:{k}")
  if granularity == "layer":
    # The spikes are clipped in exactly the tensor and the step where they occur.
    assert rms[12]["kernel"] > 3 and rms[20]["bias"] > 3
    for t, s in enumerate(stats):
      for k in SHAPES:
        assert float(s[f"clip_by_second_moment/rms/{k}"]) == pytest.approx(rms[t][k], rel=1e-4)
    assert float(stats[12]["clip_by_second_moment/scale_min"]) == pytest.approx(
      1 / rms[12]["kernel"], rel=1e-4
    )


def test_without_spikes_it_is_adamw():
  """Steady gradients keep RMS <= 1: the scale is exactly 1 and the updates are AdamW's."""
  params = _f32({k: np.full(s, 0.5) for k, s in SHAPES.items()})
  rng = np.random.default_rng(1)
  base = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
  # Shrinking gradients: v̂ holds larger squares than this step's, so every RMS is below 1.
  seq = [{k: x * 0.8**t for k, x in base.items()} for t in range(6)]
  adamw = optax.adamw(LR, b1=B1, b2=B2, eps=ADAM_EPS, weight_decay=WD)
  ours, stats, _ = _run(clipchain.clip_by_second_moment(adamw, b2=B2), params, seq)
  theirs, _, _ = _run(adamw, params, seq)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  # On the first step v̂ = g², so RMS is 1 up to rounding; after it, below 1.
  assert all(float(s["clip_by_second_moment/scale_min"]) > 1 - 1e-6 for s in stats)
  assert all(float(s["clip_by_second_moment/rms_max"]) < 1 for s in stats[1:])


def test_reads_the_moment_of_adam_inside_inject_hyperparams_and_chains():
  params = _f32({k: np.full(s, 0.5) for k, s in SHAPES.items()})
  seq = gradient_sequence(15)
  inner = optax.chain(
    optax.inject_hyperparams(optax.adamw)(
      learning_rate=LR, b1=B1, b2=B2, eps=ADAM_EPS, weight_decay=WD
    )
  )
  ours, _, _ = _run(clipchain.clip_by_second_moment(inner, b2=B2, eps=CLIP_EPS), params, seq)
  reference, _ = stable_adamw_numpy(params, seq)
  for k in SHAPES:
    np.testing.assert_allclose(ours[-1][k], reference[-1][k], rtol=2e-5, atol=1e-6)


def test_refuses_an_inner_state_without_a_second_moment_at_init():
  """The error names the states it found instead."""
  tx = clipchain.clip_by_second_moment(optax.sgd(0.1, momentum=0.9), b2=0.999)
  with pytest.raises(ValueError, match=r"found no second moment it can read.*TraceState"):
    tx.init({"w": jnp.zeros(2)})
  with pytest.raises(ValueError, match=r"found no second moment it can read.*ScaleByRssState"):
    clipchain.clip_by_second_moment(optax.adagrad(0.1), b2=0.9).init({"w": jnp.zeros(2)})


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    ({"b2": 1.0}, ValueError, r"b2 must be in \[0.0, 1.0\); got 1.0"),
    ({"b2": "0.9"}, TypeError, r"b2 must be a number"),
    ({"b2": 0.9, "eps": 0.0}, ValueError, r"eps must be in \(0.0, inf\]; got 0.0"),
    ({"b2": 0.9, "granularity": "unit"}, ValueError, r"granularity must be one of"),
    ({"b2": 0.9, "name": ""}, ValueError, r"name"),
  ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, error, match):
  with pytest.raises(error, match=match):
    clipchain.clip_by_second_moment(optax.adam(0.1), **kwargs)


def test_inner_must_be_a_transformation_not_a_factory():
  with pytest.raises(TypeError, match=r"inner must be an optax.GradientTransformation.*factory"):
    clipchain.clip_by_second_moment(optax.adam, b2=0.999)


def test_inside_skip_nonfinite_a_nan_step_leaves_params_and_moments_untouched():
  params = _f32({k: np.full(s, 0.5) for k, s in SHAPES.items()})
  seq = gradient_sequence(8)
  nan_step = dict(seq[4], kernel=np.full(SHAPES["kernel"], np.nan))
  adamw = optax.adamw(LR, b1=B1, b2=B2, eps=ADAM_EPS, weight_decay=WD)
  guarded = clipchain.skip_nonfinite(clipchain.clip_by_second_moment(adamw, b2=B2))
  ours, stats, state = _run(guarded, params, [*seq[:4], nan_step, *seq[5:]])
  clean, _, clean_state = _run(
    clipchain.skip_nonfinite(clipchain.clip_by_second_moment(adamw, b2=B2)),
    params,
    seq[:4] + seq[5:],
  )
  for a, b in zip(jax.tree.leaves(ours[-1]), jax.tree.leaves(clean[-1])):
    np.testing.assert_array_equal(a, b)
  assert float(stats[4]["skip_nonfinite/skipped"]) == 1.0
  for a, b in zip(jax.tree.leaves(state.inner_state), jax.tree.leaves(clean_state.inner_state)):
    np.testing.assert_array_equal(a, b)


def test_state_round_trips_through_orbax_and_the_run_continues_identically(tmp_path):
  params = _f32({k: np.full(s, 0.5) for k, s in SHAPES.items()})
  seq = gradient_sequence(6)
  tx = clipchain.clip_by_second_moment(optax.adam(LR, b2=B2), b2=B2)
  _, _, state = _run(tx, params, seq[:3])
  restored = orbax_round_trip(tmp_path / "ckpt", state)
  assert restored.layer_names == state.layer_names
  a, _ = tx.update(_f32(seq[3]), state, params)
  b, _ = tx.update(_f32(seq[3]), restored, params)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_vmap_and_scan():
  params = _f32({k: np.full(s, 0.5) for k, s in SHAPES.items()})
  tx = clipchain.clip_by_second_moment(optax.adam(LR, b2=B2), b2=B2)
  seq = _f32(jax.tree.map(lambda *xs: np.stack(xs), *gradient_sequence(5)))

  def train(p):
    def body(carry, g):
      p, s = carry
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), s.rms

    return jax.lax.scan(body, (p, tx.init(p)), seq)

  (final, _), rms = jax.jit(jax.vmap(train))(jax.tree.map(lambda x: jnp.stack([x, 2 * x]), params))
  assert rms.shape == (2, 5, 3)
  ours, _, _ = _run(tx, params, gradient_sequence(5))
  for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(ours[-1])):
    np.testing.assert_allclose(a[0], b, rtol=1e-6)


def test_a_step_with_large_equally_shaped_leaves_writes_no_leaf_sized_array():
  # The floor max(nu, eps² c) is one scalar for every leaf; shared by the per-leaf reductions of
  # equally shaped leaves, XLA's CPU backend would write its broadcast out as a leaf-sized array.
  params = {f"w{i}": jnp.zeros((256, 256)) for i in range(3)}
  tx = clipchain.clip_by_second_moment(optax.adam(1e-3), b2=0.999)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params).compile()
  leaf_bytes = 256 * 256 * 4
  assert compiled.memory_analysis().temp_size_in_bytes < leaf_bytes / 16


@pytest.mark.parametrize("x", [0.0, 1e-30, 1e-12, 1.0, 3e38])
def test_a_per_leaf_copy_of_a_scalar_is_the_same_value(x):
  for index in (0, 1, 999, 2**16 + 3):
    assert float(unshared(jnp.float32(x), index, size=2**20)) == float(np.float32(x))
  small_leaf_scalar = jnp.float32(x)
  assert unshared(small_leaf_scalar, 0, size=10) is small_leaf_scalar  # small leaves share it


# -- What the inner optimizer's state must hold, and how b2 is read from it -----------------------

TINY = {"w": (3,), "b": (2,)}


def tiny_gradients(steps: int = 4):
  """Gradients of a tiny tree with a 30x spike in ``w`` at the last step."""
  rng = np.random.default_rng(3)
  seq = [{k: rng.standard_normal(s) for k, s in TINY.items()} for _ in range(steps)]
  seq[-1]["w"] = seq[-1]["w"] * 30.0
  return seq


def rms_numpy(grads_seq, b2, eps=CLIP_EPS):
  """Float64 per-tensor ``sqrt(mean(g² / max(v̂, eps²)))`` at every step (the paper's equations)."""
  v = {k: np.zeros_like(g) for k, g in grads_seq[0].items()}
  out = []
  for t, g in enumerate(grads_seq, start=1):
    rms = {}
    for k in g:
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      v_hat = v[k] / (1 - b2**t)
      rms[k] = float(np.sqrt(np.mean(g[k] ** 2 / np.maximum(v_hat, eps**2))))
    out.append(rms)
  return out


ADAMS_MOMENT = {
  "adam": lambda: optax.adam(LR, b2=0.95),
  "adamw": lambda: optax.adamw(LR, b2=0.95, weight_decay=WD),
  "nadam": lambda: optax.nadam(LR, b2=0.95),
  "nadamw": lambda: optax.nadamw(LR, b2=0.95),
  "lamb": lambda: optax.lamb(LR, b2=0.95),
  "radam": lambda: optax.radam(LR, b2=0.95),
  "inject_hyperparams(adam)": lambda: optax.inject_hyperparams(optax.adam)(LR, b2=0.95),
}


@pytest.mark.parametrize("inner", ADAMS_MOMENT)
def test_reads_b2_from_every_optimizer_that_keeps_adams_moment(inner):
  """b2 is not given: it is read from the inner optimizer, whose update is scaled by exactly
  1 / max(1, RMS) of the reference."""
  params = _f32({k: np.full(s, 0.5) for k, s in TINY.items()})
  seq = tiny_gradients()
  tx = clipchain.clip_by_second_moment(ADAMS_MOMENT[inner](), eps=CLIP_EPS)
  plain = ADAMS_MOMENT[inner]()
  state, plain_state = tx.init(params), plain.init(params)
  assert state.b2 == pytest.approx(0.95, rel=1e-7)
  for g, want in zip(seq, rms_numpy(seq, 0.95)):
    ours, state = tx.update(_f32(g), state, params)
    theirs, plain_state = plain.update(_f32(g), plain_state, params)
    stats = clipchain.stats(state)
    for k in TINY:
      assert float(stats[f"clip_by_second_moment/rms/{k}"]) == pytest.approx(want[k], rel=1e-5)
      np.testing.assert_allclose(ours[k], theirs[k] / max(1.0, want[k]), rtol=1e-5, atol=1e-9)
  assert want["w"] > 1.5  # the spike was clipped


def test_a_b2_that_differs_from_the_inners_is_refused_naming_both():
  tx = clipchain.clip_by_second_moment(optax.adam(0.1, b2=0.999), b2=0.99)
  with pytest.raises(ValueError, match=r"b2=0.99 was given.*b2=0.999"):
    tx.init({"w": jnp.zeros(2)})
  # The same number, as optax keeps it in float32 under inject_hyperparams, is accepted.
  injected = optax.inject_hyperparams(optax.adam)(0.1, b2=0.999)
  assert clipchain.clip_by_second_moment(injected, b2=0.999).init({"w": jnp.zeros(2)}).b2 == 0.999


def test_b2_is_read_when_init_is_traced():
  params = {"w": jnp.zeros(3)}
  tx = clipchain.clip_by_second_moment(optax.adam(0.1, b2=0.9))
  eager = tx.init(params)
  jitted = jax.jit(tx.init)(params)
  assert jitted.b2 == eager.b2 == pytest.approx(0.9)
  assert jax.eval_shape(tx.init, params).b2 == eager.b2
  g = {"w": jnp.array([1.0, -2.0, 3.0])}
  np.testing.assert_array_equal(
    tx.update(g, jitted, params)[0]["w"], tx.update(g, eager, params)[0]["w"]
  )


NOT_ADAMS_MOMENT = {
  # No step count: nu is not bias-corrected (the study's rmsprop).
  "rmsprop": (lambda: optax.rmsprop(1e-3), r"ScaleByRmsState"),
  "rmsprop(bias_correction=True)": (
    lambda: optax.rmsprop(1e-3, bias_correction=True),
    r"ScaleByRmsWithCountState",
  ),
  "adabelief": (lambda: optax.adabelief(1e-3), r"ScaleByBeliefState"),
  "novograd": (lambda: optax.novograd(1e-3), r"ScaleByNovogradState"),
  "amsgrad": (lambda: optax.amsgrad(1e-3), r"ScaleByAmsgradState"),
  # A ScaleByAdamState whose nu is another moment: the infinity norm's EMA, Yogi's additive one.
  "adamax": (lambda: optax.adamax(1e-3), r"ScaleByAdamState does not hold Adam's second moment"),
  "yogi": (lambda: optax.yogi(1e-3), r"ScaleByAdamState does not hold Adam's second moment"),
  "MultiSteps(adam)": (
    lambda: optax.MultiSteps(optax.adam(1e-3), 2).gradient_transformation(),
    r"MultiStepsState",
  ),
}


@pytest.mark.parametrize("inner", NOT_ADAMS_MOMENT)
def test_refuses_an_optimizer_whose_second_moment_is_not_adams_at_init(inner):
  factory, match = NOT_ADAMS_MOMENT[inner]
  tx = clipchain.clip_by_second_moment(factory(), b2=0.9)
  with pytest.raises(ValueError, match=match):
    tx.init({"w": jnp.zeros(2)})


BEFORE_THE_MOMENT = {
  "optax clip": (
    lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.1)),
    r"EmptyState comes before the ScaleByAdamState",
  ),
  "clipchain clip": (
    lambda: optax.chain(clipchain.clip_by_global_norm(1.0), optax.adam(0.1)),
    r"ClipNormState comes before the ScaleByAdamState",
  ),
  "clipchain guard": (
    lambda: clipchain.skip_nonfinite(optax.adam(0.1)),
    r"ScaleByAdamState is inside a SkipNonFiniteState",
  ),
  "optax guard": (
    lambda: optax.apply_if_finite(optax.adam(0.1), 3),
    r"ScaleByAdamState is inside an? ApplyIfFiniteState",
  ),
}


@pytest.mark.parametrize("inner", BEFORE_THE_MOMENT)
def test_refuses_a_transform_that_changes_what_the_moment_sees(inner):
  factory, match = BEFORE_THE_MOMENT[inner]
  with pytest.raises(ValueError, match=match):
    clipchain.clip_by_second_moment(factory()).init({"w": jnp.zeros(2)})


def test_a_clip_placed_before_it_leaves_steady_gradients_alone():
  """The gradient clip goes in an outer chain, so the RMS compares the clipped gradient with the
  moment of the clipped gradient: on steady gradients the update is the clipped Adam's."""
  params = {"w": jnp.zeros(3)}
  g = {"w": jnp.array([10.0, -20.0, 5.0])}
  ours = optax.chain(
    optax.clip_by_global_norm(1.0), clipchain.clip_by_second_moment(optax.adam(0.1))
  )
  theirs = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.1))
  s, t = ours.init(params), theirs.init(params)
  for _ in range(3):
    u, s = ours.update(g, s, params)
    v, t = theirs.update(g, t, params)
    np.testing.assert_allclose(u["w"], v["w"], rtol=1e-6)
    assert float(clipchain.stats(s)["clip_by_second_moment/scale_min"]) > 1 - 1e-6


def test_per_label_second_moments_are_refused_clearly():
  inner = optax.multi_transform({"a": optax.adam(0.1), "b": optax.adam(0.2)}, {"w": "a", "v": "b"})
  tx = clipchain.clip_by_second_moment(inner)
  with pytest.raises(ValueError, match=r"found 2 .*ScaleByAdamState.*one per label") as info:
    tx.init({"w": jnp.zeros(2), "v": jnp.zeros(3)})
  assert "the the" not in str(info.value)
  partial = optax.multi_transform({"a": optax.adam(0.1), "b": optax.sgd(0.2)}, {"w": "a", "v": "b"})
  with pytest.raises(ValueError, match=r"nu is not shaped like the params.*\['v'\].*only some"):
    clipchain.clip_by_second_moment(partial).init({"w": jnp.zeros(2), "v": jnp.zeros(3)})


def test_an_inner_that_cannot_run_on_the_probe_is_refused_saying_why():
  inner = optax.chain(optax.adam(0.1), optax.contrib.reduce_on_plateau())
  with pytest.raises(ValueError, match=r"probe.*'value'.*outer chain"):
    clipchain.clip_by_second_moment(inner).init({"w": jnp.zeros(2)})


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "x64"])
@pytest.mark.parametrize("eps", [1e-18, 1e-30, 1e-6])
def test_a_zero_gradient_leaf_is_finite_for_every_eps(eps, x64):
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    params = {"w": jnp.zeros(3, dtype), "z": jnp.zeros(2, dtype)}
    tx = clipchain.clip_by_second_moment(optax.adam(0.1), b2=0.999, eps=eps)
    state = tx.init(params)
    seq = [{"w": np.array([1.0, -2.0, 3.0]), "z": np.zeros(2)}] * 2
    for g, want in zip(seq, rms_numpy(seq, 0.999, eps)):
      u, state = tx.update({k: jnp.asarray(v, dtype) for k, v in g.items()}, state, params)
      assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(u)), u
      stats = clipchain.stats(state)
      assert float(stats["clip_by_second_moment/rms/z"]) == 0.0
      assert float(stats["clip_by_second_moment/rms/w"]) == pytest.approx(want["w"], rel=1e-5)
      np.testing.assert_array_equal(u["z"], np.zeros(2))


def test_statistics_are_per_run_under_vmap():
  params = {"w": jnp.zeros(2), "b": jnp.zeros(1)}
  tx = clipchain.clip_by_second_moment(optax.adam(0.1), b2=0.999)
  # Run 0 spikes in w at its second step; run 1 is steady.
  runs = [
    [
      {"w": jnp.array([1.0, 1.0]), "b": jnp.array([1.0])},
      {"w": jnp.array([30.0, 30.0]), "b": jnp.array([1.0])},
    ],
    [{"w": jnp.array([1.0, 1.0]), "b": jnp.array([1.0])}] * 2,
  ]
  alone = []
  for seq in runs:
    state = tx.init(params)
    for g in seq:
      _, state = tx.update(g, state, params)
    alone.append(clipchain.stats(state))
  stack = lambda *xs: jnp.stack(xs)
  state = jax.vmap(tx.init)(jax.tree.map(stack, params, params))
  both = jax.tree.map(stack, params, params)
  step = jax.jit(jax.vmap(tx.update))
  for g0, g1 in zip(*runs):
    _, state = step(jax.tree.map(stack, g0, g1), state, both)
  batched = clipchain.stats(state)
  assert batched.keys() == alone[0].keys()
  assert float(alone[0]["clip_by_second_moment/rms_max"]) > 1.4  # sqrt(2): the bound at step 2
  assert float(alone[1]["clip_by_second_moment/rms_max"]) == pytest.approx(1.0, rel=1e-5)
  for key, value in batched.items():
    assert value.shape == (2,), key
    for i in range(2):
      assert float(value[i]) == pytest.approx(float(alone[i][key]), rel=1e-6), (key, i)


def test_the_study_offers_stable_adamw_with_exactly_the_optimizers_it_accepts():
  from clipchain.study.strategies import OPTIMIZERS, STRATEGIES

  # A matrix beside a vector: Muon gives only the vector to its Adam, a nu of part of the tree.
  params = {"w": jnp.zeros(2), "k": jnp.zeros((2, 3))}
  for optimizer, direction in OPTIMIZERS.items():
    if STRATEGIES["stable-adamw"].applies(optimizer, "after"):
      tx = STRATEGIES["stable-adamw"].transform(optimizer, "after", None, 1.0)
      assert tx.init(params).b2 == 0.999, optimizer
    else:
      with pytest.raises(
        ValueError, match=r"found no second moment|not hold Adam's|covers only some"
      ):
        clipchain.clip_by_second_moment(direction()).init(params)

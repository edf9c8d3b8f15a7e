"""SPAM's spike clipping (``thresholds.SecondMoment``, ``spam_clip``) against a float64 NumPy model.

The model is the spike test of the reference SPAM optimizer (Huang et al. 2025), written from its
equations: with ``v`` the second moment of the previous step, values with ``g**2 > theta * v``
become ``sign(g) * sqrt(theta * v)``, then ``v <- beta2 * v + (1 - beta2) * g**2`` with the
clipped ``g``; nothing is clipped during the warmup. Sequences carry single-value spikes of
100x-1000x, a whole-leaf spike and non-finite steps.
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
from clipchain.thresholds import SecondMoment

SHAPES = {"Dense_0": {"kernel": (6, 8), "bias": (8,)}, "head": {"kernel": (8, 3)}}
PATHS = ("Dense_0/bias", "Dense_0/kernel", "head/kernel")
RTOL = 1e-5


def make_sequence(steps, seed, *, spikes=(), leaf_spikes=(), nonfinite=(), zero=()):
  """Random gradients, each leaf at its own scale; ``spikes``: ``(step, path, index, factor)``
  on one value; ``leaf_spikes``: ``(step, path, factor)``; ``nonfinite``: ``(step, path, value)``;
  ``zero``: ``(steps, path, index)``, that value is 0 at those steps."""
  rng = np.random.default_rng(seed)
  base = {p: 10 ** rng.uniform(-1.0, 1.0) for p in PATHS}
  seq = [
    {
      p: base[p] * (1.0 + 0.3 * math.sin(t / 10.0)) * rng.normal(size=shape_of(SHAPES, p))
      for p in PATHS
    }
    for t in range(steps)
  ]
  for t, p, index, factor in spikes:
    seq[t][p].flat[index] *= factor
  for t, p, factor in leaf_spikes:
    seq[t][p] = seq[t][p] * factor
  for zero_steps, p, index in zero:
    for t in zero_steps:
      seq[t][p].flat[index] = 0.0
  for t, p, value in nonfinite:
    seq[t][p].flat[0] = value
  return [{p: g[p].astype(np.float32).astype(np.float64) for p in PATHS} for g in seq]


def run(tx, seq, *, with_thresholds=False):
  """Every step's updates, policy states and clipped fractions (and reported thresholds), from
  one jitted ``lax.scan``."""
  final, updates, states = scan(tx, stacked(seq))
  out = final, flat(updates), states.policy_state, np.asarray(states.clipped_fraction)
  return (*out, np.asarray(states.threshold)) if with_thresholds else out


def moments_by_path(policy_state):
  """The per-value ``v`` of the element granularity, keyed by path (leaves in ``PATHS`` order)."""
  squared = jax.tree.map(jnp.square, policy_state.rms)
  return dict(zip(PATHS, (np.asarray(v) for v in jax.tree.leaves(squared))))


def spam_reference(seq, *, threshold, beta2, warmup_steps, clip_at_zero_v=False):
  """Per step: the clipped gradients (``None`` at a non-finite step), ``v`` and the spike masks.

  A value whose ``v`` is 0 has no limit, as in clipchain; the SPAM optimizer clips it to 0
  (``clip_at_zero_v=True``), which only matters for values that were exactly 0 at every step or
  without a warmup."""
  v = {p: np.zeros(shape_of(SHAPES, p)) for p in PATHS}
  outs, moments, masks = [], [], []
  for t, g in enumerate(seq):
    if not all(np.isfinite(x).all() for x in g.values()):
      outs.append(None)
      moments.append({p: x.copy() for p, x in v.items()})
      masks.append(None)
      continue
    out, mask = {}, {}
    for p in PATHS:
      x = g[p].copy()
      mask[p] = np.zeros(x.shape, bool)
      if t >= warmup_steps:
        mask[p] = x**2 > threshold * v[p]
        if not clip_at_zero_v:
          mask[p] &= v[p] > 0
        x = np.where(mask[p], np.sign(x) * np.sqrt(threshold * v[p]), x)
      v[p] = beta2 * v[p] + (1 - beta2) * x * x
      out[p] = x
    outs.append(out)
    moments.append({p: x.copy() for p, x in v.items()})
    masks.append(mask)
  return outs, moments, masks


def check_against(seq, reference, updates, moments, fractions, *, threshold, warmup_steps):
  outs, ref_moments, masks = reference
  size = sum(math.prod(shape_of(SHAPES, p)) for p in PATHS)
  for t in range(len(seq)):
    for p in PATHS:
      np.testing.assert_allclose(moments[p][t], ref_moments[t][p], rtol=RTOL, err_msg=f"{t} {p}")
    if outs[t] is None:
      continue
    clipped_total = 0
    for p in PATHS:
      np.testing.assert_allclose(updates[p][t], outs[t][p], rtol=RTOL, atol=0, err_msg=f"{t} {p}")
      clipped = updates[p][t] != seq[t][p].astype(np.float32)
      previous = ref_moments[t - 1][p] if t else np.zeros(shape_of(SHAPES, p))
      # Values within float32 rounding of the threshold may go either way.
      with np.errstate(divide="ignore", invalid="ignore"):
        decided = np.abs(seq[t][p] ** 2 / (threshold * previous) - 1) > 1e-4
      if t < warmup_steps:
        decided = np.ones_like(decided)
      np.testing.assert_array_equal(clipped[decided], masks[t][p][decided], err_msg=f"{t} {p}")
      clipped_total += int(masks[t][p].sum())
    np.testing.assert_allclose(fractions[t], clipped_total / size, rtol=1e-6)


SPIKES = [
  (25, "Dense_0/kernel", 5, 100.0),
  (60, "head/kernel", 0, 1000.0),
  (60, "Dense_0/bias", 3, -300.0),
  (140, "Dense_0/kernel", 40, 100.0),
]
LEAF_SPIKES = [(100, "head/kernel", 50.0)]
NONFINITE = [(80, "Dense_0/kernel", np.nan), (120, "head/kernel", np.inf)]


def test_spam_clip_defaults_match_the_float64_model_step_by_step():
  seq = make_sequence(160, seed=0, spikes=SPIKES, leaf_spikes=LEAF_SPIKES, nonfinite=NONFINITE)
  tx = clipchain.spam_clip(clip_statistics=True)
  final, updates, policy, fractions = run(tx, seq)
  reference = spam_reference(seq, threshold=5000.0, beta2=0.999, warmup_steps=19)
  check_against(
    seq, reference, updates, moments_by_path(policy), fractions, threshold=5000.0, warmup_steps=19
  )
  masks = reference[2]
  # Each injected spike after the warmup is clipped, and little else is.
  for t, p, index, _ in SPIKES:
    assert masks[t][p].flat[index]
  assert masks[100]["head/kernel"].mean() > 0.3  # the leaf spike: all but the small values
  assert sum(int(m[p].sum()) for m in masks if m for p in PATHS) < 40
  assert int(final.count) == 160


@pytest.mark.parametrize(
  "threshold, beta2, warmup_steps",
  [(20.0, 0.9, 3), (200.0, 0.99, 0), (5000.0, 0.0, 1)],
  ids=["aggressive", "no-warmup", "no-memory"],
)
def test_second_moment_policy_matches_the_model(threshold, beta2, warmup_steps):
  seq = make_sequence(120, seed=1, spikes=SPIKES[:3], nonfinite=NONFINITE[:1])
  policy = SecondMoment(threshold=threshold, beta2=beta2, warmup_steps=warmup_steps)
  tx = clipchain.clip_norm(policy, granularity="element", name="spam")
  _, updates, state, fractions = run(tx, seq)
  reference = spam_reference(seq, threshold=threshold, beta2=beta2, warmup_steps=warmup_steps)
  check_against(
    seq,
    reference,
    updates,
    moments_by_path(state),
    fractions,
    threshold=threshold,
    warmup_steps=warmup_steps,
  )
  assert sum(int(m[p].sum()) for m in reference[2] if m for p in PATHS) > 3


def test_warmup_clips_nothing_and_accumulates_v():
  seq = make_sequence(
    12, seed=2, spikes=[(3, "head/kernel", 2, 1e4)], leaf_spikes=[(6, PATHS[0], 1e3)]
  )
  tx = clipchain.spam_clip(warmup_steps=10)
  _, updates, policy, fractions, thresholds = run(tx, seq, with_thresholds=True)
  assert np.isinf(thresholds[:10]).all() and np.isfinite(thresholds[10:]).all()
  for t in range(10):
    for p in PATHS:
      np.testing.assert_array_equal(updates[p][t], seq[t][p].astype(np.float32))
    assert fractions[t] == 0
  reference = spam_reference(seq, threshold=5000.0, beta2=0.999, warmup_steps=10)
  for p, v in moments_by_path(policy).items():
    np.testing.assert_allclose(v[9], reference[1][9][p], rtol=RTOL)
  # The spikes entered v unclipped: ordinary values right after the warmup are far below it.
  assert fractions[10] == 0 and fractions[11] == 0


def test_non_finite_steps_leave_v_unchanged():
  seq = make_sequence(
    30, seed=3, nonfinite=[(21, "Dense_0/bias", np.nan), (25, "head/kernel", -np.inf)]
  )
  _, updates, policy, _ = run(clipchain.spam_clip(warmup_steps=5), seq)
  moments = moments_by_path(policy)
  for t in (21, 25):
    for p in PATHS:
      np.testing.assert_array_equal(moments[p][t], moments[p][t - 1])
      assert not np.array_equal(moments[p][t + 1], moments[p][t])
  assert np.isnan(updates["Dense_0/bias"][21][0])


def test_a_value_with_no_second_moment_is_not_clipped():
  """A value that was 0 at every step has v = 0: the reference clips its first nonzero gradient to
  0 (and so keeps v = 0 forever); clipchain leaves it unclipped and starts its v."""
  first = 30
  seq = make_sequence(40, seed=4, zero=[(range(first), "head/kernel", 7)])
  _, updates, policy, _ = run(clipchain.spam_clip(), seq)
  v = moments_by_path(policy)["head/kernel"]
  assert (v[:first].reshape(first, -1)[:, 7] == 0).all()
  g = seq[first]["head/kernel"].flat[7]
  np.testing.assert_allclose(updates["head/kernel"][first].flat[7], g, rtol=RTOL)
  np.testing.assert_allclose(v[first].flat[7], 0.001 * g * g, rtol=RTOL)
  assert (v[first:].reshape(-1, 24)[:, 7] > 0).all()
  reference = spam_reference(
    seq, threshold=5000.0, beta2=0.999, warmup_steps=19, clip_at_zero_v=True
  )
  assert reference[0][first]["head/kernel"].flat[7] == 0.0
  assert reference[1][-1]["head/kernel"].flat[7] == 0.0


def test_v_is_adams_second_moment_when_chained_before_adam():
  seq = make_sequence(50, seed=5, spikes=SPIKES[:1], leaf_spikes=[(40, "Dense_0/bias", 100.0)])
  tx = optax.chain(
    clipchain.spam_clip(beta2=0.95, warmup_steps=5, clip_statistics=True), optax.adam(1e-3, b2=0.95)
  )
  params = map_shapes(jnp.zeros, SHAPES)
  _, states = loop(jax.jit(tx.update), tx.init(params), map(as_tree, seq), params)
  for state in states:
    chex.assert_trees_all_close(
      jax.tree.map(jnp.square, state[0].policy_state.rms), state[1][0].nu, rtol=1e-6
    )
  assert sum(float(state[0].clipped_fraction) > 0 for state in states) >= 2


@pytest.mark.parametrize("granularity", ["global", "layer"])
def test_norm_granularities_compare_the_squared_norm_with_its_ema(granularity):
  """At a norm granularity the same rule acts on each group's norm: clip n to sqrt(theta * v) when
  n**2 > theta * v, with v the EMA of the clipped n**2."""
  threshold, beta2, warmup = 4.0, 0.9, 5
  seq = make_sequence(
    80,
    seed=6,
    leaf_spikes=[(20, "head/kernel", 10.0), (50, PATHS[0], 30.0)],
    nonfinite=[(30, "Dense_0/kernel", np.nan)],
  )
  groups = {"all": PATHS} if granularity == "global" else {p: (p,) for p in PATHS}
  policy = SecondMoment(threshold=threshold, beta2=beta2, warmup_steps=warmup)
  _, updates, state, _ = run(clipchain.clip_norm(policy, granularity=granularity), seq)
  v = dict.fromkeys(groups, 0.0)
  clipped = 0
  for t, g in enumerate(seq):
    norms = {k: math.sqrt(sum(np.sum(g[p] ** 2) for p in ps)) for k, ps in groups.items()}
    if not all(map(math.isfinite, norms.values())):
      np.testing.assert_allclose(np.atleast_1d(state.rms[t]) ** 2, list(v.values()), rtol=RTOL)
      continue
    for k, ps in groups.items():
      n, scale = norms[k], 1.0
      if t >= warmup and n**2 > threshold * v[k]:
        scale = math.sqrt(threshold * v[k]) / n
        clipped += 1
      for p in ps:
        np.testing.assert_allclose(updates[p][t], g[p] * scale, rtol=RTOL, atol=1e-7)
      v[k] = beta2 * v[k] + (1 - beta2) * (n * scale) ** 2
    np.testing.assert_allclose(np.atleast_1d(state.rms[t]) ** 2, list(v.values()), rtol=RTOL)
  assert clipped >= 2


# Dtypes, jit, vmap, scan, checkpoints, statistics.


def test_bfloat16_gradients_keep_their_dtype():
  seq = make_sequence(25, seed=7, spikes=[(22, "head/kernel", 4, 1000.0)])
  tx = clipchain.spam_clip()
  update = jax.jit(tx.update)
  grads = [as_tree(g, jnp.bfloat16) for g in seq]
  outputs, states = loop(update, tx.init(grads[0]), grads)
  for updates, g in zip(outputs, grads):
    chex.assert_trees_all_equal_dtypes(updates, g)
  updates = outputs[-1]
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(states[-1].policy_state.rms))
  # The spike is clipped to sqrt(5000 * v), v computed in float32 from the bfloat16 values.
  bf16 = [{p: np.asarray(flat(g)[p], np.float64) for p in PATHS} for g in grads]
  reference = spam_reference(bf16, threshold=5000.0, beta2=0.999, warmup_steps=19)
  assert reference[2][22]["head/kernel"].flat[4]
  for p in PATHS:
    np.testing.assert_allclose(
      np.asarray(flat(updates)[p], np.float32), reference[0][24][p], rtol=1e-2, atol=1e-6
    )
  spike = np.asarray(flat(updates)["head/kernel"], np.float32)
  assert np.abs(spike).max() < 1000.0


def test_scan_vmap_and_a_python_loop_agree():
  seq = make_sequence(30, seed=8, spikes=[(25, "head/kernel", 1, 500.0)])
  tx = clipchain.spam_clip(warmup_steps=5)
  _, scanned, scanned_policy, _ = run(tx, seq)
  update = jax.jit(tx.update)
  looped, states = loop(update, tx.init(map_shapes(jnp.zeros, SHAPES)), map(as_tree, seq))
  for t, updates in enumerate(looped):
    for p in PATHS:
      np.testing.assert_allclose(flat(updates)[p], scanned[p][t], rtol=1e-6, atol=1e-8)
  chex.assert_trees_all_close(states[-1].policy_state.rms, at(scanned_policy.rms, -1), rtol=1e-6)
  assert update._cache_size() == 1

  other = make_sequence(30, seed=9, spikes=[(20, "Dense_0/bias", 0, 500.0)])
  batch = stack([stacked(seq), stacked(other)], axis=1)
  vupdate = jax.jit(jax.vmap(tx.update))
  outputs, states = loop(vupdate, jax.vmap(tx.init)(at(batch, 0)), unstack(batch))
  outputs = [flat(updates) for updates in outputs]
  for b, s in enumerate((seq, other)):
    _, alone, policy, _ = run(tx, s)
    for p in PATHS:
      np.testing.assert_allclose(
        np.stack([o[p][b] for o in outputs]), alone[p], rtol=1e-6, atol=1e-8
      )
    chex.assert_trees_all_close(at(states[-1].policy_state.rms, b), at(policy.rms, -1), rtol=1e-6)


def test_orbax_round_trip_is_bit_exact(tmp_path):
  seq = make_sequence(30, seed=10, spikes=[(25, "head/kernel", 3, 1000.0)])
  tx = optax.chain(clipchain.spam_clip(warmup_steps=5, clip_statistics=True), optax.adam(1e-3))
  params = map_shapes(jnp.zeros, SHAPES)
  grads = [as_tree(g) for g in seq]
  update = jax.jit(tx.update)
  _, states = loop(update, tx.init(params), grads[:10], params)
  state = states[-1]
  restored = orbax_round_trip(tmp_path / "state", state)
  chex.assert_trees_all_equal(restored, state)
  assert type(restored[0].policy_state) is type(state[0].policy_state)
  # Training on from the restored state repeats, bit for bit, training on from the saved one.
  ua, a = loop(update, state, grads[10:], params)
  ub, b = loop(update, restored, grads[10:], params)
  chex.assert_trees_all_equal(ua, ub)
  chex.assert_trees_all_equal(a[-1], b[-1])
  assert sum(float(s[0].clipped_fraction) > 0 for s in b) >= 1  # the spike at step 25


def test_stats_report_the_moment_rms_and_the_clipped_fraction():
  seq = make_sequence(25, seed=11, spikes=[(24, "head/kernel", 0, 1000.0)])
  final, _, _, fractions = run(clipchain.spam_clip(name="spam", clip_statistics=True), seq)
  stats = clipchain.stats(final)
  size = sum(math.prod(shape_of(SHAPES, p)) for p in PATHS)
  assert stats["spam/clipped_fraction"] == fractions[-1] == pytest.approx(1 / size)
  v = np.concatenate([np.ravel(x) ** 2 for x in jax.tree.leaves(final.policy_state.rms)])
  np.testing.assert_allclose(stats["spam/moment_rms"], np.sqrt(v).mean(), rtol=RTOL)
  assert np.isfinite(stats["spam/threshold"])
  layer = clipchain.clip_norm(SecondMoment(), granularity="layer", name="lay")
  state = layer.init(map_shapes(jnp.zeros, SHAPES))
  assert set(clipchain.stats(state)) >= {f"lay/moment_rms/{p}" for p in PATHS}


def test_per_value_summaries_are_measured_only_when_asked_for():
  seq = make_sequence(25, seed=11, spikes=[(24, "head/kernel", 0, 1000.0)])
  final, *_ = run(clipchain.spam_clip(name="spam"), seq)
  assert set(clipchain.stats(final)) == {"spam/norm"}
  assert final.threshold == () and final.policy_stats == {}
  asked, *_ = run(clipchain.spam_clip(name="spam", clip_statistics=True), seq)
  assert set(clipchain.stats(asked)) == {
    f"spam/{key}" for key in ("norm", "clipped_norm", "clipped_fraction", "threshold", "moment_rms")
  }
  # A threshold shared by every value costs nothing to report, and is reported either way.
  value = clipchain.clip(0.5, name="value")
  state = value.init(map_shapes(jnp.zeros, SHAPES))
  _, state = jax.jit(value.update)(as_tree(seq[0]), state)
  assert clipchain.stats(state)["value/threshold"] == 0.5


# Validation.


@pytest.mark.parametrize(
  "kwargs, argname",
  [
    (dict(threshold=0.5), "threshold"),
    (dict(threshold=math.nan), "threshold"),
    (dict(threshold=math.inf), "threshold"),
    (dict(beta2=1.0), "beta2"),
    (dict(beta2=-0.5), "beta2"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(warmup_steps=1.5), "warmup_steps"),
  ],
)
def test_invalid_hyperparameters_are_refused(kwargs, argname):
  error = TypeError if isinstance(kwargs.get("warmup_steps"), float) else ValueError
  with pytest.raises(error, match=argname):
    clipchain.spam_clip(**kwargs)
  with pytest.raises(error, match=argname):
    SecondMoment(**kwargs)


def test_every_granularity_is_accepted_and_the_preset_is_per_element():
  for granularity in ("global", "layer", "unit", "element"):
    clipchain.clip_norm(SecondMoment(), granularity=granularity)
  state = clipchain.spam_clip(name="mine").init({"w": jnp.zeros((2, 3))})
  assert state.name == "mine"
  assert state.policy_state.rms["w"].shape == (2, 3)
  with pytest.raises(ValueError, match="name"):
    clipchain.spam_clip(name="")

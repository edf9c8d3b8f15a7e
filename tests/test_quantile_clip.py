"""Quantile clipping: ``QuantileTracker`` and the ``quantile_clip`` preset (Andrew et al. 2021).

The reference is the paper's update written out below in float64 NumPy, run step by step on
sequences with spikes and non-finite steps, at the global, layer and unit granularities.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from harness import at, loop, orbax_round_trip, scan, stack

import clipchain
from clipchain.thresholds import QuantileTracker

SHAPES = {"dense": {"kernel": (8, 4), "bias": (4,)}, "out": (6,)}
SIZE = 8 * 4 + 4 + 6
SPIKES = {15: 10.0, 40: 100.0, 41: 30.0, 95: 50.0}
NAN_STEP, INF_STEP = 60, 110
STEPS = 140


def gradient_sequence(seed: int, steps: int = STEPS):
  """Float32 gradient trees of global norm ~1 (log-normal), each leaf on its own scale, with
  10x-100x spikes, one step holding a NaN and one an Inf."""
  rng = np.random.default_rng(seed)
  leaf_scale = {"kernel": 1.0, "bias": 3.0, "out": 0.3}
  seq = []
  for t in range(steps):
    size = np.exp(0.4 * rng.normal()) * SPIKES.get(t, 1.0) / np.sqrt(SIZE)

    def leaf(shape, key, size=size):
      return (size * leaf_scale[key] * rng.normal(size=shape)).astype(np.float32)

    tree = {
      "dense": {"kernel": leaf((8, 4), "kernel"), "bias": leaf((4,), "bias")},
      "out": leaf((6,), "out"),
    }
    if t == NAN_STEP:
      tree["dense"]["kernel"][2, 1] = np.nan
    if t == INF_STEP:
      tree["out"][3] = np.inf
    seq.append(tree)
  return seq


# The reference: the equations of the paper, per group, in float64.


def group_norms(leaves, granularity):
  """Flat float64 vector of the group norms, and how to expand a per-group vector per leaf."""
  squares = [np.square(x.astype(np.float64)) for x in leaves]
  if granularity == "global":
    norms = np.array([np.sqrt(sum(np.sum(s) for s in squares))])
    return norms, lambda v: [v[0]] * len(leaves)
  if granularity == "layer":
    return np.array([np.sqrt(np.sum(s)) for s in squares]), lambda v: list(v)
  # unit, flax layout: a rank-2 kernel reduces axis 0, vectors are one unit
  unit = [np.sqrt(np.sum(s, axis=0 if s.ndim == 2 else None, keepdims=True)) for s in squares]
  sizes = np.cumsum([u.size for u in unit])[:-1]

  def expand(v):
    return [part.reshape(u.shape) for part, u in zip(np.split(v, sizes), unit)]

  return np.concatenate([u.ravel() for u in unit]), expand


def reference_run(seq, granularity, q, lr, c0, lo=None, hi=None):
  """Per step: the clipped leaves, the threshold applied (C_t) and the next C (C_{t+1})."""
  c = None
  out = []
  for tree in seq:
    leaves = jax.tree.leaves(tree)
    norms, expand = group_norms(leaves, granularity)
    if c is None:
      c = np.full(norms.shape, c0, np.float64)
    threshold = c.copy()
    with np.errstate(invalid="ignore"):  # inf * 0 at the Inf step, as in float32
      scale = np.minimum(1.0, threshold / norms)
      clipped = [x * s for x, s in zip(leaves, expand(scale))]
    finite = all(np.all(np.isfinite(x)) for x in leaves)
    if finite:  # a step with a NaN or an Inf leaves C where it was
      b = (norms <= c).astype(np.float64)
      c = c * np.exp(-lr * (b - q))
      c = np.clip(c, -np.inf if lo is None else lo, np.inf if hi is None else hi)
    out.append((clipped, threshold, c.copy()))
  return out


def run(tx, seq):
  """Step by step with one jitted update: the updates and state after each step."""
  updates, states = loop(jax.jit(tx.update), tx.init(seq[0]), seq)
  return list(zip(updates, states))


def flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def assert_matches_reference(results, expected, granularity):
  clipped_steps = 0
  for t, ((updates, state), (clipped, threshold, next_c)) in enumerate(zip(results, expected)):
    msg = f"step {t}"
    for got, want in zip(jax.tree.leaves(updates), clipped):
      np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7, err_msg=msg)
    reported = threshold.mean() if granularity == "unit" else threshold
    np.testing.assert_allclose(
      np.reshape(state.threshold, -1), np.reshape(reported, -1), rtol=2e-5, err_msg=msg
    )
    quantile = state.policy_state.quantile
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(quantile))
    np.testing.assert_allclose(flat(quantile), next_c, rtol=2e-5, err_msg=msg)
    clipped_steps += int(state.clipped_fraction > 0)
  assert 0 < clipped_steps < len(results)


@pytest.mark.parametrize("granularity", ["global", "layer", "unit"])
def test_matches_reference_step_by_step(granularity):
  seq = gradient_sequence(seed=0)
  results = run(clipchain.quantile_clip(granularity=granularity), seq)
  expected = reference_run(seq, granularity, q=0.5, lr=0.2, c0=0.1)
  assert_matches_reference(results, expected, granularity)


@pytest.mark.parametrize(("q", "lr", "c0"), [(0.9, 0.05, 2.0), (0.1, 0.5, 0.3), (1.0, 0.3, 1.0)])
def test_other_hyperparameters_match_reference(q, lr, c0):
  seq = gradient_sequence(seed=1, steps=80)
  results = run(clipchain.quantile_clip(q, lr, c0), seq)
  assert_matches_reference(results, reference_run(seq, "global", q, lr, c0), "global")


def test_clamps_match_reference():
  """Opacus-style bounds: C stops at min_threshold under small norms, at max_threshold under
  large ones."""
  seq = gradient_sequence(seed=2, steps=120)
  seq = [jax.tree.map(lambda x, t=t: x * (0.01 if t < 40 else 100.0), g) for t, g in enumerate(seq)]
  policy = QuantileTracker(0.5, 0.2, 1.0, min_threshold=0.05, max_threshold=5.0)
  results = run(clipchain.clip_norm(policy, granularity="layer"), seq)
  expected = reference_run(seq, "layer", 0.5, 0.2, 1.0, lo=0.05, hi=5.0)
  assert_matches_reference(results, expected, "layer")
  quantiles = np.stack([np.asarray(s.policy_state.quantile) for _, s in results])
  np.testing.assert_array_equal(quantiles[39], np.float32(0.05))
  np.testing.assert_array_equal(quantiles[-1], np.float32(5.0))


def test_non_finite_step_leaves_the_tracker_unchanged():
  seq = gradient_sequence(seed=3, steps=INF_STEP + 1)
  for granularity in ("global", "layer", "unit"):
    results = run(clipchain.quantile_clip(granularity=granularity), seq)
    for step in (NAN_STEP, INF_STEP):
      before, after = results[step - 1][1], results[step][1]
      chex.assert_trees_all_equal(after.policy_state, before.policy_state)
      assert not np.all(np.isfinite(flat(results[step][0])))  # the NaN is not hidden
    # ... while a finite step does move it.
    moved = flat(results[NAN_STEP + 1][1].policy_state.quantile)
    assert not np.array_equal(moved, flat(results[NAN_STEP][1].policy_state.quantile))


def test_per_layer_statistics():
  seq = gradient_sequence(seed=4, steps=3)
  _, state = run(clipchain.quantile_clip(granularity="layer"), seq)[-1]
  stats = clipchain.stats(state)
  for i, layer in enumerate(("dense/bias", "dense/kernel", "out")):
    np.testing.assert_allclose(stats[f"quantile_clip/threshold/{layer}"], state.threshold[i])
  assert stats["quantile_clip/threshold/dense/kernel"] == pytest.approx(0.1 * np.exp(0.2), rel=1e-6)


@pytest.mark.parametrize("target", [0.5, 0.9])
def test_converges_to_the_target_quantile(target):
  """On i.i.d. log-normal norms, C settles at the norms' target quantile, and that fraction of
  the updates is left unclipped."""
  steps, burn_in = 6000, 1000
  rng = np.random.default_rng(5)
  norms = np.exp(0.5 * rng.normal(size=steps)).astype(np.float32)
  grads = {"g": jnp.asarray(norms[:, None] * np.array([0.6, -0.8], np.float32))}
  tx = clipchain.quantile_clip(target, learning_rate=0.05, initial_threshold=0.1)

  _, _, states = scan(tx, grads)
  thresholds, clipped = states.threshold, states.clipped_fraction
  true_quantile = np.exp(0.5 * {0.5: 0.0, 0.9: 1.2815516}[target])
  settled = np.asarray(thresholds[burn_in:])
  assert np.median(settled) == pytest.approx(true_quantile, rel=0.05)
  assert np.quantile(settled, 0.05) > 0.75 * true_quantile
  assert np.quantile(settled, 0.95) < 1.3 * true_quantile
  assert 1.0 - float(np.mean(clipped[burn_in:])) == pytest.approx(target, abs=0.02)


# Validation and granularity.


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    ({"target_quantile": -0.1}, "target_quantile"),
    ({"target_quantile": 1.5}, "target_quantile"),
    ({"target_quantile": float("nan")}, "target_quantile"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"learning_rate": -0.2}, "learning_rate"),
    ({"learning_rate": float("inf")}, "learning_rate"),
    ({"initial_threshold": 0.0}, "initial_threshold"),
    ({"initial_threshold": -1.0}, "initial_threshold"),
    ({"initial_threshold": float("inf")}, "initial_threshold"),
    ({"initial_threshold": float("nan")}, "initial_threshold"),
    ({"min_threshold": -1.0}, "min_threshold"),
    ({"min_threshold": float("inf")}, "min_threshold"),
    ({"max_threshold": 0.0}, "max_threshold"),
    ({"min_threshold": 0.5, "max_threshold": 0.2}, "min_threshold <= initial_threshold"),
    ({"initial_threshold": 0.1, "min_threshold": 0.5}, "initial_threshold=0.1"),
    ({"initial_threshold": 10.0, "max_threshold": 5.0}, "max_threshold=5.0"),
  ],
)
def test_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    QuantileTracker(**kwargs)


def test_preset_validation():
  with pytest.raises(ValueError, match="learning_rate"):
    clipchain.quantile_clip(0.5, -1.0)
  with pytest.raises(ValueError, match="granularity"):
    clipchain.quantile_clip(granularity="tree")
  with pytest.raises(ValueError, match="name"):
    clipchain.quantile_clip(name="")


def test_element_granularity_is_refused():
  with pytest.raises(ValueError, match=r"per value.*SecondMoment"):
    clipchain.quantile_clip(granularity="element")
  with pytest.raises(ValueError, match="QuantileTracker"):
    clipchain.clip_norm(QuantileTracker(), granularity=clipchain.granularity.Element())


def test_unbounded_max_threshold_is_allowed():
  policy = QuantileTracker(max_threshold=float("inf"))
  tx = clipchain.clip_norm(policy)
  g = {"w": jnp.array([3.0, 4.0])}
  _, state = tx.update(g, tx.init(g))
  assert float(state.policy_state.quantile) == pytest.approx(0.1 * np.exp(0.1), rel=1e-6)


# Composition: state shapes, vmap, scan, inject_hyperparams, Orbax.


def test_state_is_fixed_shape_float32():
  tree = gradient_sequence(seed=6, steps=1)[0]
  for granularity, shapes in [
    ("global", [()]),
    ("layer", [(3,)]),
    ("unit", [(1,), (1, 4), (1,)]),
  ]:
    state = clipchain.quantile_clip(granularity=granularity).init(tree)
    leaves = jax.tree.leaves(state.policy_state)
    assert [x.shape for x in leaves] == shapes
    assert all(x.dtype == jnp.float32 and x.size > 0 for x in leaves)
    assert all(np.all(np.asarray(x) == np.float32(0.1)) for x in leaves)


def test_scan_and_vmap_match_the_step_by_step_run():
  seq = gradient_sequence(seed=7, steps=30)
  tx = clipchain.quantile_clip(granularity="layer")
  looped = run(tx, seq)
  _, updates, states = scan(tx, stack(seq))
  quantiles = states.policy_state.quantile
  for t, (u, s) in enumerate(looped):
    chex.assert_trees_all_close(at(updates, t), u, rtol=1e-6)
    np.testing.assert_allclose(quantiles[t], s.policy_state.quantile, rtol=1e-6)

  # vmap over three independent streams: each tracks on its own.
  streams = [seq[:10], seq[10:20], seq[20:]]
  batched = [stack(steps) for steps in zip(*streams)]
  _, states = loop(jax.jit(jax.vmap(tx.update)), jax.vmap(tx.init)(batched[0]), batched)
  state = states[-1]
  for i, stream in enumerate(streams):
    expected = run(tx, stream)[-1][1].policy_state.quantile
    np.testing.assert_allclose(state.policy_state.quantile[i], expected, rtol=1e-6)


def test_inject_hyperparams_matches():
  seq = gradient_sequence(seed=8, steps=20)
  injected = optax.inject_hyperparams(clipchain.quantile_clip)(0.7, 0.3, 0.5)
  looped = loop(jax.jit(injected.update), injected.init(seq[0]), seq)
  expected = run(clipchain.quantile_clip(0.7, 0.3, 0.5), seq)
  for updates, state, (expected_updates, expected_state) in zip(*looped, expected):
    chex.assert_trees_all_close(updates, expected_updates, rtol=1e-6)
    np.testing.assert_allclose(
      state.inner_state.policy_state.quantile, expected_state.policy_state.quantile, rtol=1e-6
    )


def test_orbax_round_trip(tmp_path):
  seq = gradient_sequence(seed=9, steps=5)
  tx = optax.chain(clipchain.quantile_clip(granularity="unit"), optax.sgd(0.1))
  params = jax.tree.map(jnp.zeros_like, seq[0])
  _, states = loop(tx.update, tx.init(params), seq[:4], params)
  state = states[-1]
  restored = orbax_round_trip(tmp_path / "state", state, tx.init(params))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  chex.assert_trees_all_equal(tx.update(seq[4], restored, params), tx.update(seq[4], state, params))

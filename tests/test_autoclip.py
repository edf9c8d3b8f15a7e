"""AutoClip (:class:`clipchain.thresholds.Percentile`, :func:`clipchain.autoclip`).

Two references:

* the ``autoclip`` package's ``QuantileClip`` (torch), which ``include_current=False`` must
  reproduce step by step, globally and per parameter. Its ``clip_grad_norm_`` scales by
  ``c / (norm + 1e-6)``, so clipped values agree to ~1e-6 relative for norms of order 1;
* the paper's rule in float64 NumPy: the history holds the last ``window`` finite norms including
  the current one, the threshold is ``np.percentile`` of it.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from autoclip.torch import QuantileClip
from harness import at, loop, map_shapes, orbax_round_trip, scan, unstack

import clipchain
from clipchain.granularity import Element, Layer, Unit
from clipchain.thresholds import Percentile

SHAPES = {"a": (6, 4), "b": (4,), "c": (3, 2, 2)}
RTOL = 1e-5


def spiky_sequence(seed: int, steps: int = 90, nonfinite: dict[int, float] | None = None):
  """Random gradients with 10x-100x spikes (on the whole tree or one leaf) and optional NaN/Inf
  values at given steps, as ``{leaf: (steps, *shape)}`` float32 arrays."""
  rng = np.random.default_rng(seed)
  seq = {
    k: rng.normal(size=(steps, *s)) * 10 ** rng.uniform(-0.3, 0.3, size=(steps,) + (1,) * len(s))
    for k, s in SHAPES.items()
  }
  for i, t in enumerate(rng.choice(np.arange(2, steps), size=min(10, steps - 2), replace=False)):
    factor = 10 ** rng.uniform(1, 2)
    for k in SHAPES if i % 2 else [list(SHAPES)[i % 3]]:
      seq[k][t] *= factor
  for t, value in (nonfinite or {}).items():
    seq["b"][t, 1] = value
  return {k: v.astype(np.float32) for k, v in seq.items()}


def run(tx, seq):
  """The clipped updates, statistics and final state of ``tx`` over ``seq``, jitted with
  ``lax.scan``."""
  state, updates, stats = scan(tx, seq, clipchain.stats)
  return jax.tree.map(np.asarray, updates), jax.tree.map(np.asarray, stats), state


# The autoclip package.


def quantile_clip_reference(seq, quantile, history_length, global_threshold):
  """``QuantileClip`` over ``seq``: clipped gradients, threshold used and history length, per
  step (thresholds and lengths per parameter unless global)."""
  params = [torch.zeros(s, requires_grad=True) for s in SHAPES.values()]
  clipper = QuantileClip(params, quantile, history_length, global_threshold=global_threshold)
  steps = len(seq["a"])
  out = {k: [] for k in SHAPES}
  thresholds, lengths = [], []
  for t in range(steps):
    for p, k in zip(params, SHAPES):
      p.grad = torch.from_numpy(seq[k][t].copy())
    histories = (
      [clipper.state["global_history"]]
      if global_threshold
      else [clipper.state[p].get("history", []) for p in params]
    )
    thresholds.append([float(torch.quantile(h, quantile)) if len(h) else np.inf for h in histories])
    clipper.step()
    histories = (
      [clipper.state["global_history"]]
      if global_threshold
      else [clipper.state[p]["history"] for p in params]
    )
    lengths.append([len(h) for h in histories])
    for p, k in zip(params, SHAPES):
      out[k].append(p.grad.numpy().copy())
  return {k: np.stack(v) for k, v in out.items()}, np.array(thresholds), np.array(lengths)


def layer_norms(seq) -> np.ndarray:
  return np.stack(
    [np.sqrt(np.sum(np.float64(v) ** 2, axis=tuple(range(1, v.ndim)))) for v in seq.values()], 1
  )


@pytest.mark.parametrize("quantile, history_length", [(0.9, 25), (0.1, 40), (0.5, 1)])
def test_quantile_clip_global_parity(quantile, history_length):
  seq = spiky_sequence(0)
  tx = clipchain.autoclip(100 * quantile, window=history_length, include_current=False, name="ac")
  updates, stats, _ = run(tx, seq)
  ref, ref_thresholds, ref_lengths = quantile_clip_reference(seq, quantile, history_length, True)
  for k in SHAPES:
    np.testing.assert_allclose(updates[k], ref[k], rtol=RTOL, atol=1e-6)
  norms = np.sqrt(np.sum(layer_norms(seq) ** 2, axis=1))
  # The reference's first threshold is inf; clipchain reports the norm itself (same result).
  np.testing.assert_allclose(stats["ac/threshold"][0], norms[0], rtol=1e-6)
  np.testing.assert_allclose(stats["ac/threshold"][1:], ref_thresholds[1:, 0], rtol=RTOL)
  np.testing.assert_array_equal(stats["ac/history_length"], ref_lengths[:, 0])
  assert np.mean(stats["ac/clipped_fraction"]) > 0.05  # the test exercises clipping


def test_quantile_clip_per_parameter_parity():
  seq = spiky_sequence(1)
  tx = clipchain.autoclip(90.0, window=20, include_current=False, granularity="layer")
  updates, stats, _ = run(tx, seq)
  ref, ref_thresholds, ref_lengths = quantile_clip_reference(seq, 0.9, 20, False)
  for k in SHAPES:
    np.testing.assert_allclose(updates[k], ref[k], rtol=RTOL, atol=1e-6)
  norms = layer_norms(seq)
  for i, k in enumerate(SHAPES):
    np.testing.assert_allclose(stats[f"autoclip/norm/{k}"], norms[:, i], rtol=1e-6)
    np.testing.assert_allclose(stats[f"autoclip/threshold/{k}"][0], norms[0, i], rtol=1e-6)
    np.testing.assert_allclose(stats[f"autoclip/threshold/{k}"][1:], ref_thresholds[1:, i], RTOL)
    np.testing.assert_array_equal(stats[f"autoclip/history_length/{k}"], ref_lengths[:, i])
  assert np.mean(stats["autoclip/clipped_fraction"]) > 0.05


@pytest.mark.parametrize("global_threshold", [True, False])
def test_quantile_clip_parity_skipping_nonfinite_steps(global_threshold):
  """A NaN or Inf step changes nothing: the other steps match ``QuantileClip`` run without it
  (``QuantileClip`` itself would put the NaN in its history and clip to NaN ever after)."""
  bad = {7: np.nan, 30: np.inf, 31: -np.inf, 55: np.nan}
  seq = spiky_sequence(2, nonfinite=bad)
  granularity = "global" if global_threshold else "layer"
  tx = clipchain.autoclip(80.0, window=15, include_current=False, granularity=granularity)
  updates, stats, _ = run(tx, seq)
  good = np.array([t not in bad for t in range(len(seq["a"]))])
  ref, _, ref_lengths = quantile_clip_reference(
    {k: v[good] for k, v in seq.items()}, 0.8, 15, global_threshold
  )
  for k in SHAPES:
    np.testing.assert_allclose(updates[k][good], ref[k], rtol=RTOL, atol=1e-6)
  key = "autoclip/history_length" + ("" if global_threshold else "/a")
  np.testing.assert_array_equal(stats[key][good], ref_lengths[:, 0])
  assert not np.any(np.isfinite(updates["b"][~good][:, 1]))  # a NaN is never hidden


# The paper, in float64 NumPy.


def paper_reference(seq, percentile, window, groups):
  """Clipped gradients, thresholds and history lengths of the paper's AutoClip, per group of
  leaves (``groups``: a list of lists of leaf names); a non-finite step is not recorded."""
  leaf_norms = dict(zip(SHAPES, layer_norms(seq).T))
  norms = np.stack([np.sqrt(sum(leaf_norms[k] ** 2 for k in g)) for g in groups], 1)
  histories = [[] for _ in groups]
  thresholds, lengths = [], []
  for row in norms:
    step = []
    for h, norm in zip(histories, row):
      candidate = ([*h, norm] if np.isfinite(norm) else h)[-window:]
      step.append(np.percentile(candidate, percentile) if candidate else norm)
    if np.all(np.isfinite(row)):
      for h, norm in zip(histories, row):
        h[:] = [*h, norm][-window:]
    thresholds.append(step)
    lengths.append(len(histories[0]))
  thresholds = np.array(thresholds)
  index = {k: i for i, g in enumerate(groups) for k in g}
  with np.errstate(invalid="ignore", divide="ignore"):  # 0 * inf at an Inf step: NaN, as clipchain
    factors = np.where(norms <= thresholds, 1.0, thresholds / norms)
    out = {
      k: np.float64(v) * factors[:, index[k]].reshape((-1,) + (1,) * (v.ndim - 1))
      for k, v in seq.items()
    }
  return out, thresholds, np.array(lengths)


BAD_STEPS = {13: np.nan, 40: np.inf}


@pytest.mark.parametrize(
  "percentile, window", [(10.0, 10_000), (10.0, 16), (50.0, 7), (0.0, 12), (100.0, 12), (37.5, 1)]
)
def test_paper_semantics_global(percentile, window):
  seq = spiky_sequence(3, nonfinite=BAD_STEPS)
  updates, stats, _ = run(clipchain.autoclip(percentile, window=window), seq)
  ref, ref_thresholds, ref_lengths = paper_reference(seq, percentile, window, [list(SHAPES)])
  for k in SHAPES:
    np.testing.assert_allclose(updates[k], ref[k], rtol=RTOL, atol=1e-6)
  np.testing.assert_allclose(stats["autoclip/threshold"], ref_thresholds[:, 0], rtol=RTOL)
  np.testing.assert_array_equal(stats["autoclip/history_length"], ref_lengths)
  assert np.all(np.isfinite(stats["autoclip/threshold"]))
  # Step 1 is never clipped: its threshold is its own norm.
  assert stats["autoclip/clipped_fraction"][0] == 0.0
  for k in SHAPES:
    np.testing.assert_array_equal(updates[k][0], seq[k][0])


@pytest.mark.parametrize("layers", [None, {"ab": "^(a|b)$", "c": "^c$"}])
def test_paper_semantics_per_layer(layers):
  seq = spiky_sequence(4, nonfinite=BAD_STEPS)
  tx = clipchain.autoclip(25.0, window=11, granularity=Layer(layers))
  updates, stats, _ = run(tx, seq)
  groups = [[k] for k in SHAPES] if layers is None else [["a", "b"], ["c"]]
  names = list(SHAPES) if layers is None else ["ab", "c"]
  ref, ref_thresholds, ref_lengths = paper_reference(seq, 25.0, 11, groups)
  for k in SHAPES:
    np.testing.assert_allclose(updates[k], ref[k], rtol=RTOL, atol=1e-6)
  for i, name in enumerate(names):
    np.testing.assert_allclose(stats[f"autoclip/threshold/{name}"], ref_thresholds[:, i], RTOL)
    # Every layer's norms are positive and finite on the same steps: the same history length.
    np.testing.assert_array_equal(stats[f"autoclip/history_length/{name}"], ref_lengths)


# The ring buffer and the non-finite guard.


def scalar_steps(tx, values):
  state = tx.init({"w": jnp.zeros(1)})
  update = jax.jit(tx.update)
  for v in values:
    u, state = update({"w": jnp.array([v], jnp.float32)}, state)
    yield float(u["w"][0]), state


@pytest.mark.parametrize("include_current", [True, False])
def test_ring_buffer_wraps(include_current):
  window, norms = 4, [float(v) for v in [5, 1, 9, 2, 7, 3, 8, 4, 6, 10, 0.5]]
  tx = clipchain.autoclip(40.0, window=window, include_current=include_current)
  for t, (u, state) in enumerate(scalar_steps(tx, norms)):
    ps = state.policy_state
    expected = [norms[i] for i in range(max(0, t + 1 - window), t + 1)]
    assert int(ps.history_length) == len(expected)
    assert int(ps.position) == (t + 1) % window
    # Slot i holds the norm of the latest step s with s % window == i (0 before any).
    slots = [norms[t - (t - i) % window] if i <= t else 0.0 for i in range(window)]
    np.testing.assert_array_equal(ps.history, slots)
    past = norms[max(0, t - window) : t]
    history = expected if include_current else past
    threshold = np.percentile(history, 40.0) if history else norms[t]
    np.testing.assert_allclose(float(state.threshold), threshold, rtol=1e-6)
    np.testing.assert_allclose(u, min(norms[t], threshold), rtol=1e-6)


@pytest.mark.parametrize("include_current", [True, False])
@pytest.mark.parametrize("granularity", ["global", "layer"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_step_leaves_policy_state_unchanged(include_current, granularity, bad):
  tx = clipchain.autoclip(50.0, window=3, include_current=include_current, granularity=granularity)
  g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([1.0])}
  update = jax.jit(tx.update)
  _, state = update(g, tx.init(g))
  _, state = update(jax.tree.map(lambda x: 2 * x, g), state)
  _, after = update({"a": jnp.array([3.0, bad]), "b": jnp.array([1.0])}, state)
  chex.assert_trees_all_equal(after.policy_state, state.policy_state)
  assert np.all(np.asarray(after.policy_state.history_length) == 2)
  # The reported thresholds come from the stored norms: finite.
  assert np.all(np.isfinite(after.threshold))


# Validation.


@pytest.mark.parametrize(
  "percentile, error",
  [
    (-1.0, ValueError),
    (100.5, ValueError),
    (float("nan"), ValueError),
    ("10", TypeError),
    (True, TypeError),
    ([10.0], TypeError),
  ],
)
def test_bad_percentile(percentile, error):
  with pytest.raises(error, match="percentile"):
    clipchain.autoclip(percentile)


@pytest.mark.parametrize(
  "window, error",
  [(0, ValueError), (-5, ValueError), (2.5, TypeError), (True, TypeError), (None, TypeError)],
)
def test_bad_window(window, error):
  with pytest.raises(error, match="window"):
    clipchain.autoclip(window=window)


def test_window_as_a_concrete_integer_array():
  """As optax.inject_hyperparams passes it to init; update reads the window from the state."""
  tx = clipchain.autoclip(50.0, window=jnp.array(3))
  state = tx.init({"w": jnp.zeros(1)})
  assert state.policy_state.history.shape == (3,)


@pytest.mark.parametrize("include_current", [1, "yes", None])
def test_bad_include_current(include_current):
  with pytest.raises(TypeError, match="include_current"):
    clipchain.autoclip(include_current=include_current)


@pytest.mark.parametrize("granularity", ["unit", "element", Unit(layout="torch"), Element()])
def test_refuses_unit_and_element(granularity):
  with pytest.raises(ValueError, match="window times the parameters"):
    clipchain.autoclip(granularity=granularity)
  with pytest.raises(ValueError, match="granularity='global' or 'layer'"):
    clipchain.clip_norm(Percentile(), granularity=granularity)


def test_bad_name():
  with pytest.raises(ValueError, match="name"):
    clipchain.autoclip(name="")


# Transformations, composition, checkpoints.


def test_eager_equals_scan(maybe_jit):
  seq = spiky_sequence(5, steps=8)
  tx = clipchain.autoclip(30.0, window=5, granularity="layer")
  scanned, stats, _ = run(tx, seq)
  update = maybe_jit(tx.update)
  looped, states = loop(update, tx.init(at(seq, 0)), unstack(seq))
  for t, u in enumerate(looped):
    for k in SHAPES:
      np.testing.assert_allclose(u[k], scanned[k][t], rtol=1e-6)
  state = states[-1]
  np.testing.assert_array_equal(
    clipchain.stats(state)["autoclip/threshold/c"], stats["autoclip/threshold/c"][-1]
  )


def test_vmap_over_independent_runs():
  seqs = [spiky_sequence(seed, steps=30) for seed in (6, 7, 8)]
  tx = clipchain.autoclip(20.0, window=8)
  batched = jax.tree.map(lambda *xs: np.stack(xs, 1), *seqs)  # (steps, runs, ...)
  # One scan over the steps, each step updating the three runs at once.
  runs_tx = optax.GradientTransformation(jax.vmap(tx.init), jax.vmap(tx.update))
  _, updates, _ = scan(runs_tx, batched)
  for r, seq in enumerate(seqs):
    alone, _, _ = run(tx, seq)
    for k in SHAPES:
      np.testing.assert_allclose(updates[k][:, r], alone[k], rtol=1e-6)


def test_inject_hyperparams_percentile():
  tx = optax.inject_hyperparams(clipchain.autoclip, static_args=("window",))(50.0, window=3)
  g = {"w": jnp.array([3.0, 4.0])}
  state = tx.init(g)
  for scale in (1.0, 2.0):
    _, state = tx.update({"w": scale * g["w"]}, state)
  state.hyperparams["percentile"] = jnp.array(0.0)
  u, state = jax.jit(tx.update)(jax.tree.map(lambda x: 4 * x, g), state)
  np.testing.assert_allclose(u["w"], [3.0, 4.0], rtol=1e-6)  # clipped to the minimum norm, 5


def test_in_a_chain_with_stats_shapes():
  tx = optax.chain(clipchain.autoclip(10.0, window=4, granularity="layer"), optax.adam(1e-3))
  params = map_shapes(jnp.zeros, SHAPES)
  state = tx.init(params)
  before = clipchain.stats(state)
  seq = spiky_sequence(9, steps=3)
  _, states = loop(tx.update, state, unstack(seq), params)
  state = states[-1]
  after = clipchain.stats(state)
  assert set(before) == set(after)
  assert {"autoclip/history_length/a", "autoclip/threshold/a", "autoclip/norm/c"} <= set(after)
  assert after["autoclip/history_length/a"].dtype == jnp.float32
  assert float(after["autoclip/history_length/c"]) == 3.0
  assert optax.tree.get(state, "history").shape == (3, 4)


@pytest.mark.parametrize("granularity", ["global", "layer"])
def test_orbax_round_trip(tmp_path, granularity):
  tx = clipchain.autoclip(10.0, window=6, granularity=granularity)
  seq = spiky_sequence(10, steps=9)
  _, _, state = run(tx, seq)
  restored = orbax_round_trip(tmp_path / "state", state, tx.init(at(seq, 0)))
  chex.assert_trees_all_equal(restored, state)
  assert restored.policy_state.history_length.dtype == jnp.int32
  g = jax.tree.map(lambda x: jnp.asarray(3 * x[-1]), seq)
  chex.assert_trees_all_equal(tx.update(g, restored), tx.update(g, state))


@pytest.mark.parametrize("include_current", [True, False])
@pytest.mark.parametrize("window", [1, 2, 5])
def test_the_sorted_window_is_kept_without_sorting_and_gives_the_sorts_percentiles(
  window, include_current
):
  """The sorted copy is updated by one removal and one insertion per step; after every step it
  equals ``np.sort`` of the history's valid norms, and the threshold is bit for bit the one the
  sort of that history gives, through repeated values, zeros and non-finite norms (which never
  enter) and the buffer wrapping many times."""
  from clipchain._src.thresholds.percentile import interpolate

  rng = np.random.default_rng(window)
  norms = rng.choice([0.5, 1.0, 1.0, 2.0, 3.0], size=60).astype(np.float32)
  norms *= rng.uniform(0.5, 2.0, size=60).astype(np.float32) ** (rng.random(60) < 0.5)
  norms[[7, 19, 33]] = [0.0, np.nan, np.inf]
  policy = Percentile(37.0, window=window, include_current=include_current)
  tx = clipchain.clip_norm(policy)
  state = tx.init({"w": jnp.zeros(())})
  step = jax.jit(tx.update)
  q = jnp.float32(0.37)
  kept: list[float] = []
  for norm in norms:
    before = np.sort(np.asarray(kept, np.float32))
    if np.isfinite(norm) and norm > 0:
      kept = [*kept, float(norm)][-window:]
    _, state = step({"w": jnp.asarray(norm)}, state)
    ps = state.policy_state
    count = int(ps.history_length)
    ordered = np.asarray(ps.ordered)
    np.testing.assert_array_equal(ordered[:count], np.sort(np.asarray(kept, np.float32)))
    assert np.all(np.isinf(ordered[count:]))
    values = np.sort(np.asarray(kept, np.float32)) if include_current else before
    padded = np.concatenate([values, np.full(window - len(values), np.inf, np.float32)])
    if len(values):
      expected = interpolate(jnp.asarray(padded), jnp.int32(len(values)), q)
      if np.isfinite(norm):
        assert float(state.threshold) == float(expected), (norm, values)

"""The core contract: any threshold policy works at a granularity the package has never seen.

Two users' granularities are written here with the public extension points only: ``Rows``, one
norm per row (axis 0) of every leaf, and ``Leaves``, a subclass of ``Layer`` under a new name.
Every policy runs on them under ``jit``, ``vmap`` and ``lax.scan`` and is compared with the
policy's equations, written per group in float64 NumPy (``reference_thresholds``), over a sequence
with a row that is zero for a while, a spike and a non-finite step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from catalog import POLICIES

import clipchain
from clipchain import granularity as gran


@dataclasses.dataclass(frozen=True)
class Rows(gran.Slices):
  """One norm per row of each leaf (a scalar is one row)."""

  def reduce_axes(self, shape, path="", *, split=False):
    return tuple(range(1, len(shape)))


@dataclasses.dataclass(frozen=True)
class Leaves(gran.Layer):
  """One norm per leaf, under a name of its own."""


GRANULARITIES = {"rows": Rows, "leaves": Leaves}
SHAPES = {"k": (3, 4), "b": (4,), "s": ()}
STEPS = 9
ZERO_ROW = (0, 4)  # row 1 of "k" is 0 on these steps, and comes back after
SPIKE, NONFINITE = 6, 7
PARAMS = {
  k: jnp.asarray(np.linspace(0.5, 2.0, int(np.prod(s))).reshape(s)) for k, s in SHAPES.items()
}


def sequence(seed: int) -> dict[str, np.ndarray]:
  """``STEPS`` gradients per leaf, float32 values: rows of varied scale, a zero row, a spike."""
  rng = np.random.default_rng(seed)
  seq = {}
  for k, shape in SHAPES.items():
    x = rng.normal(size=(STEPS, *shape)) * (1 + np.arange(STEPS)).reshape((-1,) + (1,) * len(shape))
    seq[k] = x.astype(np.float32)
  seq["k"][ZERO_ROW[0] : ZERO_ROW[1], 1] = 0.0
  seq["k"][SPIKE, 0] *= 40.0
  seq["b"][NONFINITE, 2] = np.nan
  return seq


def group_count(kind: str, shape) -> int:
  """How many groups a leaf of ``shape`` has: one per row, or one."""
  return (shape[0] if shape else 1) if kind == "rows" else 1


def norms_of(kind: str, leaves: dict[str, np.ndarray]) -> np.ndarray:
  """The float64 norm of every group of every leaf (leaves with a leading steps axis),
  concatenated in leaf order: shape (steps, groups)."""
  out = []
  for k in sorted(SHAPES):
    x = np.asarray(leaves[k], np.float64)
    groups = x.reshape(x.shape[0], group_count(kind, SHAPES[k]), -1)
    out.append(np.sqrt(np.sum(groups**2, axis=-1)))
  return np.concatenate(out, axis=1)


def reference_thresholds(
  name: str, norms: np.ndarray, param_norms: np.ndarray, leaf_of: np.ndarray | None = None
) -> np.ndarray:
  """The threshold of every group at every step, from the policy's equations in float64.

  A step whose tree norm is not finite changes no state; a group whose norm is 0 moves none of its
  statistics (except SecondMoment's moment, Adam's second moment, which decays on zeros).
  ``leaf_of``: the leaf of each group, for a policy that follows a leaf's largest norm (MaxEMA,
  where the groups grow with the leaves); by default each group is its own.
  """
  steps, groups = norms.shape
  totals = np.sqrt(np.sum(norms**2, axis=1))
  out = np.zeros((steps, groups))
  if name == "MaxEMA":
    leaf_of = np.arange(groups) if leaf_of is None else np.asarray(leaf_of)
    for leaf in np.unique(leaf_of):
      members = leaf_of == leaf
      ema, seen = 0.0, 0
      for t in range(steps):
        peak = np.max(norms[t, members])  # NaN when a member is NaN
        here = bool(np.isfinite(peak) and peak > 0)
        new_ema, new_seen = (0.5 * ema + 0.5 * peak, seen + 1) if here else (ema, seen)
        out[t, members] = new_ema / (1 - 0.5**new_seen) if new_seen else np.inf
        if here and np.isfinite(totals[t]):
          ema, seen = new_ema, new_seen
    return out
  if name == "Fixed":
    out[:] = 1.0
  elif name == "Scheduled":
    for t in range(steps):
      out[t] = 2.0 + (0.5 - 2.0) * min(t, 4) / 4
  elif name == "RelativeToParams":
    out[:] = 0.5 * np.maximum(param_norms, 1e-3)
  for g in range(groups):
    history: list[float] = []
    mean = var = 0.0
    seen = 0
    c, gamma, v = 1.0, np.inf, 0.0
    for t in range(steps):
      # A group judges its own finite, positive norm; only a finite step changes the state.
      n, ok = norms[t, g], np.isfinite(totals[t])
      here = bool(np.isfinite(n) and n > 0)
      observed = ok and here
      if name == "Percentile":
        window = [*history, n][-3:] if here else history[-3:]
        out[t, g] = np.percentile(window, 50) if window else n
        if observed:
          history.append(n)
      elif name == "ZScore":
        if seen < 2:
          out[t, g] = n
          if observed:
            seen += 1
            delta = n - mean
            mean += delta / seen
            var += (delta * (n - mean) - var) / seen
        else:
          std = np.sqrt(var)
          z = (n - mean) / (std + 1e-6)
          x = mean + 1.0 * std / (z / 1.0) if z > 1.0 else n
          out[t, g] = x
          if observed:
            mean = 0.97 * mean + 0.03 * x
            var = 0.97 * var + 0.03 * (x - mean) ** 2
      elif name == "QuantileTracker":
        out[t, g] = c
        if observed:
          c = max(c * np.exp(-0.3 * (float(n <= c) - 0.5)), np.finfo(np.float32).tiny)
      elif name == "EMARatio":
        if t < 1:
          threshold = n * 1.0 / (totals[t] + 1e-6)
        elif np.isfinite(gamma):
          scale = 1.5 * gamma / (n + 1e-6)
          threshold = n * scale if scale < 1 else 1.5 * gamma
        else:
          threshold = np.inf
        out[t, g] = threshold
        clipped = min(n, threshold)
        if ok and clipped > 0:
          if t < 1:
            gamma = min(gamma, clipped)
          else:
            gamma = clipped if np.isinf(gamma) else 0.5 * gamma + 0.5 * clipped
      elif name == "NormMoments":
        if here:
          new = (0.7 * mean + 0.3 * n, 0.9 * var + 0.1 * n * n, seen + 1)
        else:
          new = (mean, var, seen)
        if new[2]:
          m_hat, v_hat = new[0] / (1 - 0.7 ** new[2]), new[1] / (1 - 0.9 ** new[2])
          out[t, g] = m_hat / (np.sqrt(v_hat) + 1e-8)
        if observed:
          mean, var, seen = new
      elif name == "SecondMoment":
        limit = np.sqrt(2.0 * v) if t >= 1 and v > 0 else np.inf
        out[t, g] = limit
        if ok:
          v = 0.5 * v + 0.5 * min(n, limit) ** 2
  return out


def reference_updates(kind, seq, thresholds: np.ndarray) -> dict[str, np.ndarray]:
  """Each group scaled by min(1, c / norm), in float64; a group whose norm is NaN becomes NaN."""
  norms = norms_of(kind, seq)
  scale = np.where(norms > thresholds, thresholds / np.where(norms > 0, norms, 1.0), 1.0)
  scale[np.isnan(norms)] = np.nan
  out, start = {}, 0
  for k in sorted(SHAPES):
    shape, count = SHAPES[k], group_count(kind, SHAPES[k])
    per_row = shape and kind == "rows"
    group_shape = (count,) + (1,) * (len(shape) - 1) if per_row else (1,) * len(shape)
    factor = scale[:, start : start + count].reshape((STEPS, *group_shape))
    out[k] = np.asarray(seq[k], np.float64) * factor
    start += count
  return out


# Percentile keeps a window per group: refused where groups grow with the leaves (see below).
CASES = [(k, p) for k in GRANULARITIES for p in POLICIES if (k, p) != ("rows", "Percentile")]
cases = pytest.mark.parametrize("kind, name", CASES, ids=[f"{k}-{p}" for k, p in CASES])


def transform(kind: str, name: str):
  return clipchain.clip_norm(POLICIES[name](), granularity=GRANULARITIES[kind](), name="user")


def mean_threshold(stats):
  """The threshold statistic averaged over groups (a Layer subclass reports it per layer)."""
  keys = sorted(k for k in stats if k.startswith("user/threshold"))
  return sum(stats[k] for k in keys) / len(keys)


def scan_run(tx, seq):
  """One ``lax.scan`` over the steps: per-step updates and reported mean thresholds."""

  def step(state, grads):
    updates, state = tx.update(grads, state, PARAMS)
    return state, (updates, mean_threshold(clipchain.stats(state)))

  return jax.lax.scan(step, tx.init(PARAMS), seq)[1]


def check(kind, name, seq, updates, reported):
  norms = norms_of(kind, seq)
  param_norms = norms_of(kind, {k: p[None] for k, p in PARAMS.items()})[0]
  leaf_of = np.concatenate(
    [np.full(group_count(kind, SHAPES[k]), i) for i, k in enumerate(sorted(SHAPES))]
  )
  thresholds = reference_thresholds(name, norms, param_norms, leaf_of)
  want = reference_updates(kind, seq, thresholds)
  for k in SHAPES:
    # The NaN value stays NaN (never hidden); everything else equals the reference.
    got = np.asarray(updates[k])
    np.testing.assert_allclose(got, want[k], rtol=2e-5, atol=1e-6, err_msg=k, equal_nan=True)
  assert np.isnan(np.asarray(updates["b"])[NONFINITE, 2])
  mean = thresholds.mean(axis=1)
  judged = np.isfinite(norms).all(axis=1)
  np.testing.assert_allclose(np.asarray(reported)[judged], mean[judged], rtol=2e-5)


@cases
def test_every_policy_on_a_users_granularity_under_scan_and_vmap(kind, name):
  """Two independent runs, vmapped over a jitted lax.scan, each against the reference."""
  seqs = [sequence(0), sequence(1)]
  batch = {k: jnp.stack([s[k] for s in seqs], axis=1) for k in SHAPES}
  tx = transform(kind, name)
  updates, reported = jax.jit(jax.vmap(lambda s: scan_run(tx, s), in_axes=1, out_axes=1))(batch)
  for i, seq in enumerate(seqs):
    check(kind, name, seq, jax.tree.map(lambda x, i=i: x[:, i], updates), reported[:, i])


@cases
def test_every_policy_on_a_users_granularity_step_by_step_under_jit(kind, name):
  """Eager init, then one jitted update per step: the same numbers as the reference."""
  seq = sequence(2)
  tx = transform(kind, name)
  state = tx.init(PARAMS)
  step = jax.jit(lambda g, s: tx.update(g, s, PARAMS))
  updates, reported = [], []
  for t in range(STEPS):
    u, state = step({k: jnp.asarray(v[t]) for k, v in seq.items()}, state)
    updates.append(u)
    reported.append(mean_threshold(clipchain.stats(state)))
  check(kind, name, seq, jax.tree.map(lambda *x: np.stack(x), *updates), np.stack(reported))


def test_capabilities_not_names_decide_what_a_policy_refuses():
  """A granularity whose groups grow with the leaves refuses a window per group, whatever its
  name; one with a group per value refuses per-group statistics."""

  @dataclasses.dataclass(frozen=True)
  class Values(gran.Slices):
    one_group_per_value = True

    def reduce_axes(self, shape, path="", *, split=False):
      return ()

  with pytest.raises(ValueError, match=r"Rows\(\), whose groups grow with the size"):
    clipchain.clip_norm(POLICIES["Percentile"](), granularity=Rows())
  for policy in ("ZScore", "QuantileTracker", "EMARatio"):
    with pytest.raises(ValueError, match=r"Values\(\)"):
      clipchain.clip_norm(POLICIES[policy](), granularity=Values())
  clipchain.clip_norm(POLICIES["SecondMoment"](), granularity=Values())


def test_granularities_and_policies_are_immutable_values():
  layer = gran.Layer("module", norm="rms")
  assert repr(layer) == (
    "Layer(layers='module', norm='rms', stacked_axes=0, stacked_axis_name='layers', "
    "stacked_mesh_axes=())"
  )
  assert layer == gran.Layer("module", norm="rms")
  # A mapping given to a granularity is kept hashable: the state that holds it is jit's key.
  regex = gran.Layer({"attn": "attn/", "rest": ".*"}, stacked_axes={"layers/": 1})
  assert hash(regex) == hash(
    gran.Layer({"attn": "attn/", "rest": ".*"}, stacked_axes={"layers/": 1})
  )
  with pytest.raises(dataclasses.FrozenInstanceError):
    layer.norm = "l2"
  policy = POLICIES["ZScore"]()
  assert repr(policy).startswith("ZScore(alpha=0.97, z_thresh=1.0")
  with pytest.raises(dataclasses.FrozenInstanceError):
    policy.alpha = 0.5

"""Properties of clipping that hold for any finite update and any threshold.

For the norm granularities (global, layer, unit): every group's norm is at most the threshold
after clipping, and equal to it when it was above; each group keeps its direction; a group below
the threshold is unchanged; clipping twice is clipping once. For the element granularity: every
value lies in ``[-c, c]``. Shapes are fixed and one compiled function per granularity serves every
example (the threshold is a traced argument).
"""

from __future__ import annotations

import functools

import hypothesis.extra.numpy as hnp
import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import clipchain

SETTINGS = settings(deadline=None, max_examples=50, derandomize=True, database=None)

SHAPES = {"kernel": (3, 4), "bias": (5,), "conv": (2, 3, 2), "scale": ()}
BOUND = 1e4

# No subnormals: XLA on CPU flushes them to zero in any arithmetic, an identity multiply included
# (as it does for optax), so "unchanged below the threshold" cannot hold for them bit for bit.
values = st.floats(-BOUND, BOUND, width=32, allow_subnormal=False)
trees = st.fixed_dictionaries(
  {name: hnp.arrays(np.float32, shape, elements=values) for name, shape in SHAPES.items()}
)
thresholds = st.floats(2.0**-10, BOUND, width=32)


@functools.cache
def clip_twice(granularity: str):
  """A jitted ``(tree, threshold) -> (clipped once, clipped twice, state after once)``."""

  def run(tree, threshold):
    tx = clipchain.clip_norm(threshold, granularity=granularity)
    state = tx.init(tree)
    once, state_once = tx.update(tree, state)
    twice, _ = tx.update(once, state)
    return once, twice, state_once

  return jax.jit(run)


def groups(tree, granularity: str) -> list[np.ndarray]:
  """The values of each group a norm is measured over, as float64 vectors, in a fixed order."""
  leaves = [np.asarray(tree[name], np.float64) for name in SHAPES]
  if granularity == "global":
    return [np.concatenate([x.ravel() for x in leaves])]
  if granularity == "layer":
    return [x.ravel() for x in leaves]
  assert granularity == "unit"  # flax layout: rank 2 and 3 reduce axis 0, vectors are one unit
  out = []
  for x in leaves:
    if x.ndim <= 1:
      out.append(x.ravel())
    else:
      out.extend(x.reshape(x.shape[0], -1).T)
  return out


def norms(vectors) -> np.ndarray:
  return np.array([np.linalg.norm(v) for v in vectors])


NORM_GRANULARITIES = ["global", "layer", "unit"]


@pytest.mark.parametrize("granularity", NORM_GRANULARITIES)
@SETTINGS
@given(tree=trees, threshold=thresholds)
def test_norm_is_at_most_the_threshold(granularity, tree, threshold):
  once, _, state = clip_twice(granularity)(tree, np.float32(threshold))
  before, after = norms(groups(tree, granularity)), norms(groups(once, granularity))
  assert np.all(after <= threshold * (1 + 2e-6))
  over = before > threshold * (1 + 1e-5)
  np.testing.assert_allclose(after[over], threshold, rtol=2e-6)
  # (The float32 statistic underflows for norms below ~1e-19, hence the atol.)
  clipped_norm = float(state.clipped_norm)
  np.testing.assert_allclose(clipped_norm, np.linalg.norm(after), rtol=1e-5, atol=1e-18)


@SETTINGS
@given(tree=trees, threshold=thresholds)
def test_element_values_lie_within_the_threshold(tree, threshold):
  once, _, state = clip_twice("element")(tree, np.float32(threshold))
  c = np.float32(threshold)
  for name in SHAPES:
    x, y = np.asarray(tree[name]), np.asarray(once[name])
    assert np.all(np.abs(y) <= c)
    np.testing.assert_array_equal(y, np.clip(x, -c, c))
  size = sum(np.size(v) for v in tree.values())
  over = sum(int(np.sum(np.abs(v) > c)) for v in tree.values())
  np.testing.assert_allclose(float(state.clipped_fraction), over / size, rtol=1e-6)


@pytest.mark.parametrize("granularity", NORM_GRANULARITIES)
@SETTINGS
@given(tree=trees, threshold=thresholds)
def test_direction_is_kept(granularity, tree, threshold):
  once, _, _ = clip_twice(granularity)(tree, np.float32(threshold))
  for x, y in zip(groups(tree, granularity), groups(once, granularity)):
    if not np.any(x):
      assert not np.any(y)
      continue
    cosine = np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y))
    assert cosine >= 1 - 1e-6
    assert np.linalg.norm(y) <= np.linalg.norm(x) * (1 + 1e-6)  # scaled down, never up


@pytest.mark.parametrize("granularity", [*NORM_GRANULARITIES, "element"])
@SETTINGS
@given(tree=trees, margin=st.floats(1.0001, 100.0))
def test_identity_below_the_threshold(granularity, tree, margin):
  if granularity == "element":
    largest = max(float(np.max(np.abs(v), initial=0.0)) for v in tree.values())
  else:
    largest = float(np.max(norms(groups(tree, granularity))))
  once, _, state = clip_twice(granularity)(tree, np.float32(largest * margin))
  for name in SHAPES:
    np.testing.assert_array_equal(np.asarray(once[name]), tree[name])
  assert float(state.clipped_fraction) == 0.0


@pytest.mark.parametrize("granularity", NORM_GRANULARITIES)
@SETTINGS
@given(tree=trees, threshold=thresholds)
def test_clipping_is_idempotent(granularity, tree, threshold):
  once, twice, _ = clip_twice(granularity)(tree, np.float32(threshold))
  for name in SHAPES:
    np.testing.assert_allclose(np.asarray(twice[name]), np.asarray(once[name]), rtol=1e-6)


@SETTINGS
@given(tree=trees, threshold=thresholds)
def test_element_clipping_is_idempotent(tree, threshold):
  once, twice, _ = clip_twice("element")(tree, np.float32(threshold))
  for name in SHAPES:
    np.testing.assert_array_equal(np.asarray(twice[name]), np.asarray(once[name]))

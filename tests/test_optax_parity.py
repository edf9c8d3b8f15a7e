"""clipchain's optax namesakes: the same positional signature and the same float32 results.

Where optax is right (float32 updates, thresholds that are neither zero nor shared by a norm),
switching the import must not change a single value beyond float32 rounding.
"""

from __future__ import annotations

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from harness import random_tree, updater

import clipchain

RTOL = 1e-6
ATOL = 1e-7

SHAPES = {"dense": {"kernel": (8, 4), "bias": (4,)}, "conv": (3, 3, 2, 4), "scale": ()}
BATCHED_SHAPES = {"dense": {"kernel": (6, 8, 4), "bias": (6, 4)}, "scale": (6,), "emb": (6, 3, 5)}


def batched_tree(seed: int):
  """Per-example gradients whose examples' norms spread over two orders of magnitude."""
  rng = np.random.default_rng(seed)
  example_scale = 10.0 ** rng.uniform(-1.0, 1.0, size=6)
  tree = random_tree(BATCHED_SHAPES, seed)
  return jax.tree.map(lambda x: x * example_scale.reshape((6,) + (1,) * (x.ndim - 1)), tree)


PAIRS = [
  (clipchain.clip, optax.clip),
  (clipchain.clip_by_global_norm, optax.clip_by_global_norm),
  (clipchain.clip_by_block_rms, optax.clip_by_block_rms),
  (clipchain.per_example_global_norm_clip, optax.per_example_global_norm_clip),
  (clipchain.per_example_layer_norm_clip, optax.per_example_layer_norm_clip),
]


def positional(fn):
  kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
  params = inspect.signature(fn).parameters.values()
  return [(p.name, p.default) for p in params if p.kind in kinds]


@pytest.mark.parametrize(("ours", "theirs"), PAIRS, ids=[p[1].__name__ for p in PAIRS])
def test_same_positional_signature(ours, theirs):
  assert positional(ours) == positional(theirs)
  # Anything clipchain adds is keyword-only, so positional calls written for optax still work.
  extra = set(inspect.signature(ours).parameters) - set(inspect.signature(theirs).parameters)
  for name in extra:
    assert inspect.signature(ours).parameters[name].kind is inspect.Parameter.KEYWORD_ONLY


TRANSFORMS = {
  "clip": (clipchain.clip, optax.clip),
  "clip_by_global_norm": (clipchain.clip_by_global_norm, optax.clip_by_global_norm),
  "clip_by_block_rms": (clipchain.clip_by_block_rms, optax.clip_by_block_rms),
}
# Thresholds relative to the tree's largest group norm (or largest |value| for clip).
FRACTIONS = [1e-3, 0.1, 0.5, 2.0]


def largest_group(name: str, tree) -> float:
  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
  if name == "clip":
    return max(float(np.max(np.abs(x))) for x in leaves)
  if name == "clip_by_global_norm":
    return float(np.sqrt(sum(np.sum(x * x) for x in leaves)))
  return max(float(np.sqrt(np.mean(x * x))) for x in leaves)


def updates_of(make_tx, threshold, tree, maybe_jit):
  return maybe_jit(updater(make_tx))(tree, threshold)[0]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("fraction", FRACTIONS)
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transform_matches_optax(name, fraction, seed, maybe_jit):
  ours, theirs = TRANSFORMS[name]
  tree = random_tree(SHAPES, seed)
  threshold = fraction * largest_group(name, tree)
  expected = updates_of(theirs, threshold, tree, maybe_jit)
  got = updates_of(ours, threshold, tree, maybe_jit)
  chex.assert_trees_all_equal_structs(got, expected)
  chex.assert_trees_all_equal_shapes_and_dtypes(got, expected)
  chex.assert_trees_all_close(got, expected, rtol=RTOL, atol=ATOL)
  if fraction < 1:  # the comparison must be about clipping, not about two identities
    assert not all(jax.tree.leaves(jax.tree.map(jnp.array_equal, got, tree)))


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transform_matches_optax_with_array_threshold(name, maybe_jit):
  ours, theirs = TRANSFORMS[name]
  tree = random_tree(SHAPES, seed=2)
  threshold = jnp.float32(0.3 * largest_group(name, tree))
  expected = updates_of(theirs, threshold, tree, maybe_jit)
  got = updates_of(ours, threshold, tree, maybe_jit)
  chex.assert_trees_all_equal_shapes_and_dtypes(got, expected)
  chex.assert_trees_all_close(got, expected, rtol=RTOL, atol=ATOL)


# Integer updates: optax's clip and clip_by_block_rms return float32 values that a fractional
# threshold or scale makes; clipchain must not truncate them back to integers.
INT_TREE = {"w": jnp.array([[-3, 0, 2], [5, 1, -1]], jnp.int32), "b": jnp.array([4, -7], jnp.int32)}


@pytest.mark.parametrize("threshold", [1.5, 2.5])
@pytest.mark.parametrize("name", ["clip", "clip_by_block_rms"])
def test_integer_updates_match_optax(name, threshold, maybe_jit):
  ours, theirs = TRANSFORMS[name]
  expected = updates_of(theirs, threshold, INT_TREE, maybe_jit)
  got = updates_of(ours, threshold, INT_TREE, maybe_jit)
  chex.assert_trees_all_equal_dtypes(got, expected)
  chex.assert_trees_all_close(got, expected, rtol=RTOL, atol=ATOL)


def test_integer_updates_global_norm_match_optax_on_floats(maybe_jit):
  # optax.clip_by_global_norm raises a TypeError on integer updates (lax.select of float32 and
  # int32); clipchain gives what optax gives for the same values as float32.
  with pytest.raises(TypeError):
    updates_of(optax.clip_by_global_norm, 2.5, INT_TREE, lambda fn: fn)
  floats = jax.tree.map(lambda x: x.astype(jnp.float32), INT_TREE)
  expected = updates_of(optax.clip_by_global_norm, 2.5, floats, maybe_jit)
  got = updates_of(clipchain.clip_by_global_norm, 2.5, INT_TREE, maybe_jit)
  chex.assert_trees_all_equal_dtypes(got, expected)
  chex.assert_trees_all_close(got, expected, rtol=RTOL, atol=ATOL)


PER_EXAMPLE = {
  "global": (
    clipchain.per_example_global_norm_clip,
    optax.per_example_global_norm_clip,
  ),
  "layer_uniform": (
    lambda g, c: clipchain.per_example_layer_norm_clip(g, c, True),
    lambda g, c: optax.per_example_layer_norm_clip(g, c, True),
  ),
  "layer_by_size": (
    lambda g, c: clipchain.per_example_layer_norm_clip(g, c, uniform=False),
    lambda g, c: optax.per_example_layer_norm_clip(g, c, uniform=False),
  ),
}


# The examples' global norms range from 3 to 77: every example clipped, some, none.
@pytest.mark.parametrize("clip_norm", [jnp.inf, 0.0, 1.0, 10.0, 100.0])
@pytest.mark.parametrize("name", list(PER_EXAMPLE))
def test_per_example_matches_optax(name, clip_norm, maybe_jit):
  ours, theirs = PER_EXAMPLE[name]
  grads = batched_tree(seed=3)
  expected = maybe_jit(theirs)(grads, clip_norm)
  got = maybe_jit(ours)(grads, clip_norm)
  # Same structure: (summed tree, int32 count) or (summed tree, tree of int32 counts).
  chex.assert_trees_all_equal_structs(got, expected)
  chex.assert_trees_all_equal_shapes_and_dtypes(got, expected)
  chex.assert_trees_all_close(got[0], expected[0], rtol=RTOL, atol=1e-6)
  chex.assert_trees_all_equal(got[1], expected[1])
  counts = np.asarray(jax.tree.leaves(got[1]))
  if clip_norm == jnp.inf:
    assert counts.sum() == 0
  elif clip_norm == 0.0:
    assert np.all(counts == 6)
    chex.assert_trees_all_equal(got[0], jax.tree.map(jnp.zeros_like, got[0]))
  elif clip_norm == 10.0:  # some examples clipped, some not
    assert np.any((counts > 0) & (counts < 6))


# optax's own docstring examples, integer gradients included.
DOCTEST_GRADS = [jnp.array([[0, 0, 0], [0, 3, 4], [4, 0, 3], [3, 4, 0]])]
DOCTEST_CASES = [(jnp.inf, 7.0, 0), (0.0, 0.0, 3), (1.25, 1.75, 3)]


@pytest.mark.parametrize(("clip_norm", "value", "count"), DOCTEST_CASES)
@pytest.mark.parametrize("name", list(PER_EXAMPLE))
def test_per_example_optax_doctests(name, clip_norm, value, count, maybe_jit):
  ours, theirs = PER_EXAMPLE[name]
  expected = maybe_jit(theirs)(DOCTEST_GRADS, clip_norm)
  got = maybe_jit(ours)(DOCTEST_GRADS, clip_norm)
  chex.assert_trees_all_equal_structs(got, expected)
  chex.assert_trees_all_equal_shapes_and_dtypes(got, expected)
  chex.assert_trees_all_close(got[0], expected[0], rtol=RTOL)
  chex.assert_trees_all_equal(got[1], expected[1])
  summed, clipped = got
  assert isinstance(summed, list) and summed[0].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(summed[0]), [value] * 3, rtol=1e-6)
  assert [int(n) for n in jax.tree.leaves(clipped)] == [count]
  assert all(n.dtype == jnp.int32 for n in jax.tree.leaves(clipped))


def test_per_example_layer_clip_with_one_leaf_is_the_global_clip(maybe_jit):
  # optax documents it: with a single leaf both per-example functions agree.
  grads = [batched_tree(seed=4)["emb"]]
  summed, counts = maybe_jit(clipchain.per_example_layer_norm_clip)(grads, 1.0)
  summed_global, count = maybe_jit(clipchain.per_example_global_norm_clip)(grads, 1.0)
  chex.assert_trees_all_close(summed, summed_global, rtol=RTOL)
  assert int(counts[0]) == int(count) > 0

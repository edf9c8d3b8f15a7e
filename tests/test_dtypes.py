"""Low-precision gradients: norms accumulate in float32, updates keep their dtype.

Norms are summed in float32 across and within leaves whatever the gradient dtype, so thousands of
bf16 leaves give the float64 norm and fp16 gradients whose sum of squares overflows fp16 still
clip correctly. Updates come out in the dtype they came in, also with a strongly typed float32
threshold and through ``optax.inject_hyperparams`` on a tree mixing float32 and bf16 leaves.
Where optax (as installed) gets a case wrong, the test says so, to document why clipchain exists.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from harness import norm64, random_tree, updater

import clipchain


def test_1000_bf16_leaves_norm_and_clip():
  # Eager on purpose: compiling a 2000-leaf program takes long, running it eagerly seconds.
  rng = np.random.default_rng(0)
  leaves = jax.device_put(list(rng.normal(size=(1000, 4)).astype(ml_dtypes.bfloat16)))
  exact = norm64(leaves)
  tx = clipchain.clip_by_global_norm(1.0)
  out, state = tx.update(leaves, tx.init(leaves))
  assert abs(float(state.norm) - exact) / exact < 1e-3
  assert state.norm.dtype == jnp.float32
  assert all(x.dtype == jnp.bfloat16 for x in out)
  assert abs(norm64(out) - 1.0) < 5e-3  # only the bf16 rounding of each value is left

  # optax sums the per-leaf results in bf16: the norm and the clipped update are far off.
  optax_norm = float(optax.tree.norm(leaves))
  assert abs(optax_norm - exact) / exact > 0.1
  optax_tx = optax.clip_by_global_norm(1.0)
  optax_out, _ = optax_tx.update(leaves, optax_tx.init(leaves))
  assert abs(norm64(optax_out) - 1.0) > 0.1


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_large_leaf_norm_accumulates_in_float32(dtype, maybe_jit):
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1 << 17,)), dtype)
  tx = clipchain.clip_by_global_norm(1.0)
  out, state = maybe_jit(tx.update)(x, tx.init(x))
  np.testing.assert_allclose(float(state.norm), norm64(x), rtol=1e-5)
  assert out.dtype == dtype
  np.testing.assert_allclose(norm64(out), 1.0, rtol=2e-3)


FP16_SHAPES = {"kernel": (64, 32), "bias": (32,), "conv": (3, 3, 4, 8), "scale": ()}


def fp16_tree(seed: int):
  """fp16 values up to ~4000: a single square overflows fp16 (max 65504), let alone a sum."""
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.normal(size=s) * 1000.0, jnp.float16) for k, s in FP16_SHAPES.items()}


def unit_norms64(x) -> np.ndarray:
  """Norms of the flax-layout units of the FP16_SHAPES leaves."""
  x = np.asarray(x, np.float64)
  axes = {0: None, 1: None, 2: (0,), 4: (0, 1, 2)}[x.ndim]
  return np.sqrt(np.sum(x * x, axis=axes))


@pytest.mark.parametrize("granularity", ["global", "layer", "unit"])
def test_fp16_overflowing_squares_clip_correctly(granularity, maybe_jit):
  tree = fp16_tree(seed=2)
  assert not np.isfinite(float(jnp.sum(tree["kernel"] * tree["kernel"])))  # fp16 overflows
  tx = clipchain.clip_norm(1.0, granularity=granularity)
  out, state = maybe_jit(tx.update)(tree, tx.init(tree))
  np.testing.assert_allclose(float(state.norm), norm64(tree), rtol=1e-5)
  assert float(state.clipped_fraction) == 1.0
  for name, x in out.items():
    assert x.dtype == jnp.float16
    assert np.all(np.isfinite(np.asarray(x)))
    # Every group is far above 1, so every group comes out with norm 1 (to fp16 rounding), in the
    # direction it had.
    if granularity == "global":
      continue
    norms = unit_norms64(x) if granularity == "unit" else norm64(x)
    np.testing.assert_allclose(norms, 1.0, rtol=2e-3, err_msg=name)
    original = np.asarray(tree[name], np.float64)
    scale = norms / (unit_norms64(original) if granularity == "unit" else norm64(original))
    np.testing.assert_allclose(np.asarray(x, np.float64), original * scale, rtol=2e-3, atol=1e-6)
  np.testing.assert_allclose(norm64(out), float(state.clipped_norm), rtol=2e-3)
  if granularity == "global":
    np.testing.assert_allclose(norm64(out), 1.0, rtol=2e-3)
    factor = 1.0 / norm64(tree)
    for name, x in out.items():
      expected = np.asarray(tree[name], np.float64) * factor
      np.testing.assert_allclose(np.asarray(x, np.float64), expected, rtol=2e-3, atol=1e-6)


def test_fp16_optax_overflows():
  # The contrast: optax's norm is inf and its clip silently zeroes the update.
  tree = fp16_tree(seed=2)
  assert np.isinf(float(optax.tree.norm(tree)))
  tx = optax.clip_by_global_norm(1.0)
  out, _ = tx.update(tree, tx.init(tree))
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(out))


# Every transform, through the core and the presets, on bf16 (and fp16) updates.
FACTORIES = {
  "global": functools.partial(clipchain.clip_norm, granularity="global"),
  "layer": functools.partial(clipchain.clip_norm, granularity="layer"),
  "unit": functools.partial(clipchain.clip_norm, granularity="unit"),
  "element": functools.partial(clipchain.clip_norm, granularity="element"),
  "clip_by_block_rms": clipchain.clip_by_block_rms,
}
PRESETS = {
  "clip": clipchain.clip,
  "clip_by_global_norm": clipchain.clip_by_global_norm,
  "clip_by_block_rms": clipchain.clip_by_block_rms,
  "clip_by_layer_norm": clipchain.clip_by_layer_norm,
}
SHAPES = {"dense": {"kernel": (8, 4), "bias": (4,)}, "conv": (3, 3, 2, 4), "scale": ()}


def as_float32(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def assert_close_to_float32_run(out, reference, dtypes_tree):
  """Low-precision outputs equal the float32 computation on the same values, to one rounding."""
  for got, want, original in zip(*(jax.tree.leaves(t) for t in (out, reference, dtypes_tree))):
    assert got.dtype == original.dtype
    rtol = 2.0 ** -(jnp.finfo(got.dtype).nmant + 1) * 1.01 if got.dtype != jnp.float32 else 1e-6
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("threshold", [0.5, jnp.float32(0.5)], ids=["float", "float32"])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_bf16_in_bf16_out(name, threshold, maybe_jit):
  tree = random_tree(SHAPES, 3, jnp.bfloat16)
  out, state = maybe_jit(updater(FACTORIES[name]))(tree, threshold)
  reference, reference_state = updater(FACTORIES[name])(as_float32(tree), 0.5)
  assert_close_to_float32_run(out, reference, tree)
  assert float(state.clipped_fraction) > 0  # something was clipped
  for stat in ("norm", "clipped_norm", "clipped_fraction", "threshold"):
    value, want = getattr(state, stat), getattr(reference_state, stat)
    assert value.dtype == jnp.float32, stat
    np.testing.assert_allclose(np.asarray(value), np.asarray(want), rtol=1e-5, err_msg=stat)


@pytest.mark.parametrize("name", ["global", "unit", "element", "clip_by_block_rms"])
def test_fp16_in_fp16_out(name, maybe_jit):
  tree = random_tree(SHAPES, 4, jnp.float16)
  out, _ = maybe_jit(updater(FACTORIES[name]))(tree, 0.5)
  reference, _ = updater(FACTORIES[name])(as_float32(tree), 0.5)
  assert_close_to_float32_run(out, reference, tree)


def mixed_dtype(path: str):
  return jnp.bfloat16 if path.startswith("dense") else jnp.float32


@pytest.mark.parametrize("name", list(PRESETS))
def test_inject_hyperparams_mixed_precision(name, maybe_jit):
  preset = PRESETS[name]
  tree = random_tree(SHAPES, 5, mixed_dtype)
  tx = optax.inject_hyperparams(preset)(0.5)
  state = tx.init(tree)
  update = maybe_jit(tx.update)
  out, state = update(tree, state)
  reference, _ = updater(preset)(as_float32(tree), 0.5)
  assert_close_to_float32_run(out, reference, tree)
  # A second step (the hyperparameter now an array in the state) keeps every dtype, including
  # those of the state, so the update can be a lax.scan carry.
  out2, state2 = update(tree, state)
  assert_close_to_float32_run(out2, reference, tree)
  assert jax.tree.map(lambda x: x.dtype, state2) == jax.tree.map(lambda x: x.dtype, state)


def test_optax_inject_hyperparams_mixed_precision_is_broken():
  # The contrast: optax's global-norm clip raises, its element and RMS clips return float32.
  tree = random_tree(SHAPES, 5, mixed_dtype)
  tx = optax.inject_hyperparams(optax.clip_by_global_norm)(0.5)
  with pytest.raises(TypeError):
    tx.update(tree, tx.init(tree))
  for make in (optax.clip, optax.clip_by_block_rms):
    tx = optax.inject_hyperparams(make)(0.5)
    out, _ = tx.update(tree, tx.init(tree))
    assert out["dense"]["kernel"].dtype == jnp.float32

"""Against PyTorch's clipping utilities, on the same float32 gradients.

``torch.nn.utils.clip_grad_norm_`` scales by ``max_norm / (total_norm + 1e-6)``, clipchain by
``max_norm / total_norm``: clipped values agree to ~1e-6 relative for norms of order 1 and more.
``clip_grad_value_`` clamps, as ``clipchain.clip`` does, so those agree exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from harness import norm64, updater

import clipchain

SHAPES = [(8, 4), (4,), (3, 3, 2, 4), (), (5, 1)]


def random_leaves(seed: int) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [(rng.normal(size=s) * 10.0 ** rng.uniform(-1, 1)).astype(np.float32) for s in SHAPES]


def torch_params(leaves):
  params = []
  for x in leaves:
    p = torch.zeros(x.shape, dtype=torch.float32, requires_grad=True)
    p.grad = torch.from_numpy(np.array(x))
    params.append(p)
  return params


def clip_by_global_norm_named(c):
  return clipchain.clip_by_global_norm(c, name="clip")


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fraction", [0.01, 0.5, 0.999, 2.0])
def test_clip_by_global_norm_matches_clip_grad_norm(fraction, seed, maybe_jit):
  leaves = random_leaves(seed)
  exact = norm64(leaves)
  max_norm = fraction * exact
  params = torch_params(leaves)
  torch_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
  expected = [p.grad.numpy() for p in params]

  out, state = maybe_jit(updater(clip_by_global_norm_named))(
    [jnp.asarray(x) for x in leaves], max_norm
  )
  for got, want in zip(out, expected):
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)
  stats = clipchain.stats(state)
  np.testing.assert_allclose(float(stats["clip/norm"]), torch_norm, rtol=1e-6)
  np.testing.assert_allclose(float(stats["clip/norm"]), exact, rtol=1e-6)
  torch_clipped = norm64(expected)
  np.testing.assert_allclose(float(stats["clip/clipped_norm"]), torch_clipped, rtol=1e-5)
  assert float(stats["clip/clipped_fraction"]) == float(fraction < 1)
  if fraction > 1:  # both leave the gradients untouched
    for got, x in zip(out, leaves):
      np.testing.assert_array_equal(np.asarray(got), x)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("clip_value", [0.0, 0.05, 0.5, 5.0, 100.0])
def test_clip_matches_clip_grad_value(clip_value, seed, maybe_jit):
  leaves = random_leaves(seed)
  params = torch_params(leaves)
  torch.nn.utils.clip_grad_value_(params, clip_value)
  with_statistics = functools.partial(clipchain.clip, clip_statistics=True)
  out, state = maybe_jit(updater(with_statistics))([jnp.asarray(x) for x in leaves], clip_value)
  for got, p in zip(out, params):
    np.testing.assert_array_equal(np.asarray(got), p.grad.numpy())
  values = np.concatenate([x.ravel() for x in leaves])
  expected_fraction = np.mean(np.abs(values) > np.float32(clip_value))
  np.testing.assert_allclose(float(state.clipped_fraction), expected_fraction, rtol=1e-6)
  assert (0 < expected_fraction < 1) or clip_value in (0.0, 100.0)


def test_torch_epsilon_is_the_only_difference():
  # A small norm makes torch's +1e-6 visible: clipchain clips to exactly max_norm.
  leaves = [np.full((4,), 1e-3, np.float32)]
  params = torch_params(leaves)
  torch.nn.utils.clip_grad_norm_(params, 1e-3)
  tx = clipchain.clip_by_global_norm(1e-3)
  out, _ = tx.update([jnp.asarray(leaves[0])], tx.init([jnp.asarray(leaves[0])]))
  ours = float(np.linalg.norm(np.asarray(out[0], np.float64)))
  theirs = float(np.linalg.norm(params[0].grad.numpy().astype(np.float64)))
  np.testing.assert_allclose(ours, 1e-3, rtol=1e-6)
  np.testing.assert_allclose(theirs, 1e-3 * 2e-3 / (2e-3 + 1e-6), rtol=1e-6)
  assert jax.tree.leaves(out)[0].dtype == jnp.float32

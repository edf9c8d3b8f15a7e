"""Per-example clipping for differentially private training, as optax's functions.

These are functions of a batch of per-example gradients (every leaf has the example on axis 0),
not transforms: each example is clipped, then the batch is summed.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from clipchain._src import norms
from clipchain._src.validation import check_bool, check_non_negative


def _check_batched(grads, fn: str) -> None:
  leaves = jax.tree.leaves(grads)
  if not leaves or any(
    jnp.ndim(g) < 1 or jnp.shape(g)[0] != jnp.shape(leaves[0])[0] for g in leaves
  ):
    raise ValueError(
      f"{fn} expects every leaf of grads to have the same batch size on axis 0; got shapes "
      f"{jax.tree.map(jnp.shape, grads)}."
    )


def _example_squares(g: jax.Array) -> jax.Array:
  """Each example's float32 sum of squares over one leaf, shape ``(batch,)``."""
  return norms.sum_of_squares(g, axis=tuple(range(1, jnp.ndim(g))))


def _clip_and_sum(grads, example_norms: jax.Array, clip_norm) -> tuple:
  multipliers = norms.clip_scale(example_norms, jnp.asarray(clip_norm, jnp.float32))
  num_clipped = jnp.sum(multipliers < 1.0)

  def weighted_sum(g):
    acc = norms.accumulation_dtype(g.dtype)
    out_dtype = norms.output_dtype(g.dtype)
    return jnp.tensordot(multipliers.astype(acc), g.astype(acc), axes=1).astype(out_dtype)

  return jax.tree.map(weighted_sum, grads), num_clipped


def per_example_global_norm_clip(
  grads: Any, l2_norm_clip: float | jax.Array
) -> tuple[Any, jax.Array]:
  """Clips each example's gradient to a global L2 norm, then sums over the batch.

  Same signature and results as ``optax.per_example_global_norm_clip``, with norms accumulated
  in float32 and a finite result for zero-norm examples at a zero threshold.

  Args:
    grads: a tree whose leaves all have the batch on axis 0.
    l2_norm_clip: the largest L2 norm of one example's gradient (``inf`` disables clipping).

  Returns:
    ``(summed, num_clipped)``: the sum over examples of the clipped gradients, and how many
    examples were clipped.

  Examples:
    >>> import jax.numpy as jnp, clipchain
    >>> grads = [jnp.array([[0, 0, 0], [0, 3, 4], [4, 0, 3], [3, 4, 0]])]
    >>> clipchain.per_example_global_norm_clip(grads, 1.25)
    ([Array([1.75, 1.75, 1.75], dtype=float32)], Array(3, dtype=int32))

  References:
    Abadi et al., `Deep Learning with Differential Privacy
    <https://arxiv.org/abs/1607.00133>`_, 2016
  """
  _check_batched(grads, "per_example_global_norm_clip")
  check_non_negative("l2_norm_clip", l2_norm_clip, allow_inf=True)
  example_squares = jnp.asarray(sum(_example_squares(g) for g in jax.tree.leaves(grads)))
  return _clip_and_sum(grads, norms.safe_sqrt(example_squares), l2_norm_clip)


def per_example_layer_norm_clip(
  grads: Any, global_l2_norm_clip: float | jax.Array, uniform: bool = True
) -> tuple[Any, Any]:
  """Clips each example's gradient layer by layer, then sums over the batch.

  Same signature and results as ``optax.per_example_layer_norm_clip``: with ``K`` leaves and
  ``C = global_l2_norm_clip``, each leaf is clipped to ``C / sqrt(K)`` (``uniform=True``) or to
  ``C * sqrt(D_i / D)`` with ``D_i`` the leaf's size and ``D`` the total (``uniform=False``), so the
  clipped example's global norm is at most ``C``.

  Args:
    grads: a tree whose leaves all have the batch on axis 0.
    global_l2_norm_clip: the overall L2 bound ``C``.
    uniform: how ``C`` is shared among leaves (see above).

  Returns:
    ``(summed, num_clipped)``: trees shaped like ``grads`` of the summed clipped gradients and of
    the number of examples clipped in each leaf.

  Examples:
    >>> import jax.numpy as jnp, clipchain
    >>> grads = [jnp.array([[0, 0, 0], [0, 3, 4], [4, 0, 3], [3, 4, 0]])]
    >>> clipchain.per_example_layer_norm_clip(grads, 1.25)
    ([Array([1.75, 1.75, 1.75], dtype=float32)], [Array(3, dtype=int32)])

  References:
    McMahan et al., `Learning Differentially Private Recurrent Language Models
    <https://arxiv.org/abs/1710.06963>`_, 2018
  """
  _check_batched(grads, "per_example_layer_norm_clip")
  check_non_negative("global_l2_norm_clip", global_l2_norm_clip, allow_inf=True)
  check_bool("uniform", uniform)
  leaves, treedef = jax.tree.flatten(grads)
  total_size = sum(g[0].size for g in leaves)
  summed, clipped = [], []
  for g in leaves:
    share = 1.0 / len(leaves) if uniform else g[0].size / total_size
    s, n = _clip_and_sum(g, norms.safe_sqrt(_example_squares(g)), global_l2_norm_clip * share**0.5)
    summed.append(s)
    clipped.append(n)
  return jax.tree.unflatten(treedef, summed), jax.tree.unflatten(treedef, clipped)

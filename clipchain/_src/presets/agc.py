"""Adaptive gradient clipping (AGC): each unit's update clipped relative to its weights' norm."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import optax

from clipchain._src.clip_norm import clip_norm
from clipchain._src.distributed import AxisName
from clipchain._src.granularity import Unit
from clipchain._src.masking import MaskLike
from clipchain._src.stacking import StackedSpec
from clipchain._src.thresholds.relative import RelativeToParams


def adaptive_grad_clip(
  clipping: float,
  eps: float = 1e-3,
  axis: int | Sequence[int] | None = None,
  *,
  layout: Literal["flax", "torch"] = "flax",
  stacked_axes: StackedSpec = 0,
  mask: MaskLike = None,
  name: str = "adaptive_grad_clip",
  axis_name: AxisName = None,
) -> optax.GradientTransformation:
  """Clips each unit of the updates to at most ``clipping`` times its params' norm.

  A drop-in replacement for ``optax.adaptive_grad_clip``, with the same positional signature and
  the same float32 results: each unit ``i`` (the slice of a weight that feeds one output) is
  scaled by ``min(1, λ·max(‖W_i‖, eps) / ‖G_i‖)``. Unlike optax it knows PyTorch-style weights
  (``layout="torch"``) and stacked (scanned) layers (``stacked_axes``), whose layer axis optax's
  default reduces over, and it reports the fraction of units clipped in its statistics.

  The NFNet recipe leaves the final classifier unclipped (wrap it in ``optax.masked``) and clips
  the raw gradient, before momentum and weight decay.

  Args:
    clipping: the largest allowed ratio ``λ`` of a unit's update norm to its params norm (a
      finite number >= 0; 0.01 at batch size 4096 in the paper).
    eps: the smallest params norm, so zero-initialised params can still move (finite, >= 0).
    axis: the axes that one unit spans, for every leaf; overrides ``layout``.
    layout: ``"flax"`` for ``(..., in, out)`` kernels (Flax, Haiku): scalars and vectors are one
      unit, rank 2 and 3 reduce axis 0, rank 4 (HWIO) axes 0-2, rank 5 axes 0-3, as optax;
      ``"torch"`` for ``(out, in, ...)`` weights (PyTorch ports, Equinox): every axis but the
      first is reduced.
    stacked_axes: which leading axes of a leaf index stacked layers (``nn.scan``, ``vmap``-ed
      layers); they are kept out of the reduction, so each layer is clipped on its own: an int
      (every leaf), a ``{path regex: int}`` mapping (first match; the other leaves are not
      stacked) or a callable ``(path, leaf) -> int``. Boxed parameters whose partition metadata
      names an axis ``"layers"`` are stacked along it without being told (see
      :class:`clipchain.granularity.Unit`).
    mask: as for :func:`clipchain.clip_norm`.
    name: as for :func:`clipchain.clip_norm`.
    axis_name: as for :func:`clipchain.clip_norm`.

  ``axis`` and ``stacked_axes`` define the units, so they must be Python ints: under
  ``optax.inject_hyperparams`` the defaults (``None``) work as they are; to set either, name it in
  ``static_args``.

  Returns:
    An ``optax.GradientTransformation`` that must be called with the params,
    ``tx.update(updates, state, params)``; ``clipped_fraction`` in its statistics is the fraction
    of units clipped and ``threshold`` the mean threshold over units.

  Examples:
    >>> import jax.numpy as jnp, optax, clipchain
    >>> params = {"kernel": jnp.array([[3.0, 1.0], [4.0, 0.0]])}
    >>> tx = optax.chain(clipchain.adaptive_grad_clip(0.1), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> grads = {"kernel": jnp.array([[1.0, 0.05], [0.0, 0.0]])}
    >>> updates, state = tx.update(grads, state, params)
    >>> updates["kernel"]
    Array([[-0.5 , -0.05],
           [-0.  , -0.  ]], dtype=float32)
    >>> float(clipchain.stats(state)["adaptive_grad_clip/clipped_fraction"])
    0.5

  References:
    Brock et al., `High-Performance Large-Scale Image Recognition Without Normalization
    <https://arxiv.org/abs/2102.06171>`_, 2021
  """
  granularity = Unit(axis, layout=layout, stacked_axes=stacked_axes)
  return clip_norm(
    RelativeToParams(clipping, eps),
    granularity=granularity,
    mask=mask,
    name=name,
    axis_name=axis_name,
  )

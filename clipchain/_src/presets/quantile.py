"""Quantile clipping: clip to an online estimate of a quantile of the norms (Andrew et al. 2021)."""

from __future__ import annotations

import optax

from clipchain._src.clip_norm import clip_norm
from clipchain._src.distributed import AxisName
from clipchain._src.granularity import GranularityLike, as_granularity
from clipchain._src.masking import MaskLike
from clipchain._src.stacking import StackedSpec
from clipchain._src.thresholds.quantile import QuantileTracker


def quantile_clip(
  target_quantile: float = 0.5,
  learning_rate: float = 0.2,
  initial_threshold: float = 0.1,
  *,
  granularity: GranularityLike = "global",
  stacked_axes: StackedSpec = 0,
  mask: MaskLike = None,
  name: str = "quantile_clip",
  axis_name: AxisName = None,
) -> optax.GradientTransformation:
  """Clips updates to a running estimate of the ``target_quantile`` of their norms.

  The threshold ``C`` starts at ``initial_threshold`` and after each update moves geometrically,
  ``C ← C · exp(-learning_rate · (1[‖g‖ <= C] - target_quantile))``, so that in the long run a
  fraction ``target_quantile`` of the updates is left unclipped. The update of step ``t`` is
  clipped to ``C_t``, the estimate before it is seen. A streaming AutoClip: O(1) memory per group
  instead of a history of norms. For the optional clamps of ``C`` use
  :class:`clipchain.thresholds.QuantileTracker` with :func:`clipchain.clip_norm`.

  Args:
    target_quantile: the fraction of updates left unclipped at equilibrium, in ``[0, 1]``.
    learning_rate: the step size ``η`` of the geometric update, > 0.
    initial_threshold: the first threshold ``C_0``, > 0. ``C`` moves by a factor of at most
      ``exp(learning_rate)`` per step, so start it near the expected norm.
    granularity: ``"global"`` (one tracker), ``"layer"`` (one per layer), ``"unit"``, or a
      :mod:`clipchain.granularity` object; not ``"element"``.
    stacked_axes: with the layer or unit granularity, which leading axes of a leaf index stacked
      (scanned) layers, each then clipped on its own: an int (every leaf), a ``{path regex: int}``
      mapping or a callable ``(path, leaf) -> int`` (see :class:`clipchain.granularity.Layer`).
    mask: as for :func:`clipchain.clip_norm`.
    name: as for :func:`clipchain.clip_norm`.
    axis_name: as for :func:`clipchain.clip_norm`.

  Returns:
    An ``optax.GradientTransformation``; ``threshold`` in its statistics is the ``C`` applied at
    the last update.

  Examples:
    >>> import jax.numpy as jnp, optax, clipchain
    >>> tx = optax.chain(clipchain.quantile_clip(initial_threshold=1.0), optax.sgd(1.0))
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.array([3.0, 4.0])}, state, params)
    >>> updates["w"]
    Array([-0.6, -0.8], dtype=float32)
    >>> float(clipchain.stats(state)["quantile_clip/threshold"])
    1.0

  References:
    Andrew et al., `Differentially Private Learning with Adaptive Clipping
    <https://arxiv.org/abs/1905.03871>`_, 2021
  """
  policy = QuantileTracker(target_quantile, learning_rate, initial_threshold)
  return clip_norm(
    policy,
    granularity=as_granularity(granularity, stacked_axes),
    mask=mask,
    name=name,
    axis_name=axis_name,
  )

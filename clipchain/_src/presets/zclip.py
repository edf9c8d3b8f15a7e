"""ZClip: clip gradient-norm spikes detected by a z-score against EMA statistics."""

from __future__ import annotations

from typing import Literal

import optax

from clipchain._src.clip_norm import clip_norm
from clipchain._src.distributed import AxisName
from clipchain._src.granularity import GranularityLike, as_granularity
from clipchain._src.masking import MaskLike
from clipchain._src.stacking import StackedSpec
from clipchain._src.thresholds.zscore import ZScore


def zclip(
  alpha: float = 0.97,
  z_thresh: float = 2.5,
  max_grad_norm: float | None = 1.0,
  eps: float = 1e-6,
  warmup_steps: int = 25,
  mode: Literal["zscore", "percentile"] = "zscore",
  clip_option: Literal["adaptive_scaling", "mean"] = "adaptive_scaling",
  clip_factor: float = 1.0,
  skip_update_on_spike: bool = False,
  *,
  granularity: GranularityLike = "global",
  stacked_axes: StackedSpec = 0,
  mask: MaskLike = None,
  name: str = "zclip",
  axis_name: AxisName = None,
) -> optax.GradientTransformation:
  """Clips gradient-norm spikes found by a z-score against an EMA of the norm (ZClip).

  The arguments and their defaults are those of ``zclip.ZClip`` (package ``zclip`` 1.0.0), whose
  results this reproduces step by step in float32: the first ``warmup_steps`` norms start an EMA
  of the norm's mean and variance (meanwhile only ``max_grad_norm`` clips); afterwards a norm
  whose z-score exceeds ``z_thresh`` is clipped to an adaptive threshold, and every threshold is
  capped by ``max_grad_norm``. See :class:`clipchain.thresholds.ZScore` for the equations. Call it
  once per optimizer step on the whole gradient, as ``ZClip.step(model)``.

  Args:
    alpha: the EMA decay of the mean and variance, in (0, 1).
    z_thresh: the z-score above which a norm is a spike (``mode="percentile"``: clip at
      ``mean + z_thresh * std``), > 0.
    max_grad_norm: a fixed cap on the threshold at every step (warmup included), or ``None``.
    eps: added to the standard deviation in the z-score, >= 0.
    warmup_steps: the number of positive norms collected before the statistics start, > 0.
    mode: ``"zscore"`` or ``"percentile"``.
    clip_option: ``"adaptive_scaling"`` (clip to ``mean + z_thresh**2 * std / z``, times
      ``clip_factor``) or ``"mean"`` (clip to the mean); only used with ``mode="zscore"``.
    clip_factor: multiplies the adaptive-scaling threshold, > 0.
    skip_update_on_spike: leave the statistics unchanged when a spike is found.
    granularity: ``"global"`` (ZClip); ``"layer"`` (or a :class:`clipchain.granularity.Layer`):
      one ZClip per layer, each with its own statistics; ``"unit"``: one per output unit.
      ``"element"`` is refused.
    stacked_axes: with the layer or unit granularity, which leading axes of a leaf index stacked
      (scanned) layers, each then clipped on its own: an int (every leaf), a ``{path regex: int}``
      mapping or a callable ``(path, leaf) -> int`` (see :class:`clipchain.granularity.Layer`).
    mask: as for :func:`clipchain.clip_norm`.
    name: as for :func:`clipchain.clip_norm`.
    axis_name: as for :func:`clipchain.clip_norm`.

  Returns:
    An ``optax.GradientTransformation``; :func:`clipchain.stats` reports, besides the norm and the
    threshold, ``"{name}/mean"``, ``"{name}/std"``, ``"{name}/z"`` (the last z-score),
    ``"{name}/spike"`` (1.0 if the last norm was a spike) and ``"{name}/warmup_remaining"``,
    per layer with the layer granularity.

  Examples:
    >>> import jax.numpy as jnp, optax, clipchain
    >>> tx = optax.chain(clipchain.zclip(warmup_steps=3), optax.sgd(1.0))
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> for g in [0.5, 0.6, 0.4, 0.5, 5.0]:
    ...   updates, state = tx.update({"w": jnp.array([g, 0.0])}, state, params)
    >>> s = clipchain.stats(state)
    >>> float(s["zclip/spike"]), float(s["zclip/norm"]), round(float(s["zclip/threshold"]), 4)
    (1.0, 5.0, 0.509)
    >>> round(float(s["zclip/mean"]), 4), int(s["zclip/warmup_remaining"])
    (0.5003, 0)

  References:
    Kumar, Owen, Roy Chowdhury and Güra, `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
    <https://arxiv.org/abs/2504.02507>`_, 2025
  """
  policy = ZScore(
    alpha=alpha,
    z_thresh=z_thresh,
    max_grad_norm=max_grad_norm,
    eps=eps,
    warmup_steps=warmup_steps,
    mode=mode,
    clip_option=clip_option,
    clip_factor=clip_factor,
    skip_update_on_spike=skip_update_on_spike,
  )
  return clip_norm(
    policy,
    granularity=as_granularity(granularity, stacked_axes),
    mask=mask,
    name=name,
    axis_name=axis_name,
  )

"""SPAM's spike-aware clipping: clip values far above their running RMS (Huang et al. 2025)."""

from __future__ import annotations

import optax

from clipchain._src.clip_norm import clip_norm
from clipchain._src.distributed import AxisName
from clipchain._src.granularity import Element, GranularityLike, as_granularity
from clipchain._src.masking import MaskLike
from clipchain._src.stacking import StackedSpec
from clipchain._src.thresholds.second_moment import SecondMoment
from clipchain._src.validation import check_bool


def spam_clip(
  threshold: float = 5000.0,
  beta2: float = 0.999,
  warmup_steps: int = 19,
  *,
  granularity: GranularityLike = "element",
  stacked_axes: StackedSpec = 0,
  clip_statistics: bool = False,
  mask: MaskLike = None,
  name: str = "spam_clip",
  axis_name: AxisName = None,
) -> optax.GradientTransformation:
  """Clips every value whose square exceeds ``threshold`` times an EMA of its square (SPAM).

  The spike-aware clipping of the SPAM optimizer as a gradient transformation: with ``v`` the
  EMA of ``g²`` up to the previous update (per value), a value with ``g² > threshold · v`` is set
  to ``sign(g) · sqrt(threshold · v)``; then ``v ← beta2 · v + (1 - beta2) · g_clipped²``. Nothing
  is clipped during the first ``warmup_steps`` updates. Chain it before ``optax.adam(b2=beta2)``:
  ``v`` is then Adam's second moment, as in SPAM (whose momentum reset is not included). It keeps
  one float32 value per parameter. See :class:`clipchain.thresholds.SecondMoment` for the details,
  including values whose ``v`` is 0, which are not clipped, and the other granularities.

  Args:
    threshold: ``θ``, a finite number >= 1; 5000 clips values above about 70 times their
      running RMS.
    beta2: the EMA decay of ``v``, in ``[0, 1)``.
    warmup_steps: the number of updates during which nothing is clipped, >= 0; 19 is the
      reference's ``grad_accu_steps=20`` (clipping from the 20th update on).
    granularity: ``"element"`` (SPAM); at ``"global"``, ``"layer"`` or ``"unit"`` the same rule
      compares each group's squared norm with ``threshold`` times its EMA.
    clip_statistics: at the element granularity, whether to also measure and report
      ``clipped_norm``, ``clipped_fraction``, the mean ``threshold`` and ``moment_rms`` (see
      :func:`clipchain.clip`: a pass over the gradient each on XLA's CPU backend; static under
      ``optax.inject_hyperparams``). Without them only ``norm`` is reported. The other
      granularities always report them.
    stacked_axes: with the layer or unit granularity, which leading axes of a leaf index stacked
      (scanned) layers, each then clipped on its own: an int (every leaf), a ``{path regex: int}``
      mapping or a callable ``(path, leaf) -> int`` (see :class:`clipchain.granularity.Layer`).
    mask: as for :func:`clipchain.clip_norm`.
    name: as for :func:`clipchain.clip_norm`.
    axis_name: as for :func:`clipchain.clip_norm`.

  Returns:
    An ``optax.GradientTransformation``; in its statistics (with ``clip_statistics=True`` at the
    element granularity) ``clipped_fraction`` is the fraction of values clipped, ``threshold``
    the mean per-value threshold (``inf`` during the warmup) and ``"{name}/moment_rms"`` the mean
    over values of ``sqrt(v)``.

  Examples:
    >>> import jax.numpy as jnp, optax, clipchain
    >>> tx = optax.chain(clipchain.spam_clip(warmup_steps=5, clip_statistics=True), optax.sgd(1.0))
    >>> params = {"w": jnp.zeros(3)}
    >>> state = tx.init(params)
    >>> for step in range(6):  # a spike in the last value at the last step
    ...   g = jnp.array([1.0, -1.0, 1.0 if step < 5 else 1e4])
    ...   updates, state = tx.update({"w": g}, state, params)
    >>> -updates["w"]  # clipped to sqrt(5000 * v), v = 1 - 0.999**5
    Array([ 1.       , -1.       ,  4.9950027], dtype=float32)
    >>> float(clipchain.stats(state)["spam_clip/clipped_fraction"])
    0.3333333432674408

  References:
    Huang et al., `SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training
    <https://arxiv.org/abs/2501.06842>`_, 2025
  """
  check_bool("clip_statistics", clip_statistics)
  policy = SecondMoment(threshold=threshold, beta2=beta2, warmup_steps=warmup_steps)
  if isinstance(granularity, str) and granularity == "element":
    granularity = Element(clip_statistics=clip_statistics)
  return clip_norm(
    policy,
    granularity=as_granularity(granularity, stacked_axes),
    mask=mask,
    name=name,
    axis_name=axis_name,
  )

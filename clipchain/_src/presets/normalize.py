"""Normalising instead of capping: each group's norm is set to the threshold."""

from __future__ import annotations

import optax

from clipchain._src.clip_norm import ThresholdLike, as_policy, clip_norm
from clipchain._src.distributed import AxisName
from clipchain._src.granularity import GranularityLike, as_granularity
from clipchain._src.masking import MaskLike
from clipchain._src.rules import Normalize
from clipchain._src.stacking import StackedSpec


def normalize(
  norm: ThresholdLike = 1.0,
  stabilizer: float = 0.0,
  *,
  granularity: GranularityLike = "global",
  stacked_axes: StackedSpec = 0,
  mask: MaskLike = None,
  name: str = "normalize",
  axis_name: AxisName = None,
) -> optax.GradientTransformation:
  """Scales every group of the updates to norm ``norm``: ``g * norm / (‖g‖ + stabilizer)``.

  At the global granularity with ``stabilizer=0`` this is normalised gradient descent: the update's
  direction is kept and its length set. With a small ``stabilizer`` (0.01 in the paper) it is
  automatic clipping: a group much larger than the stabilizer comes out with norm ``norm``, a
  group much smaller is scaled by about ``norm / stabilizer``, never blown up from noise. A zero
  group stays zero. The preset of :func:`clipchain.clip_norm` with the normalize rule
  (:class:`clipchain.rules.Normalize`); the
  element granularity is refused (each value would become ``±norm``).

  Args:
    norm: the norm each group is set to (a number, a schedule or a policy).
    stabilizer: added to each group's norm before dividing, a finite number >= 0.
    granularity: ``"global"``, ``"layer"``, ``"unit"`` or a :mod:`clipchain.granularity` object.
    stacked_axes: with the layer or unit granularity, which leading axes of a leaf index stacked
      (scanned) layers, each then clipped on its own: an int (every leaf), a ``{path regex: int}``
      mapping or a callable ``(path, leaf) -> int`` (see :class:`clipchain.granularity.Layer`).
    mask: as for :func:`clipchain.clip_norm`.
    name: as for :func:`clipchain.clip_norm`.
    axis_name: as for :func:`clipchain.clip_norm`.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`clipchain.ClipNormState`;
    ``clipped_fraction`` is the fraction of groups whose norm was changed.

  Examples:
    >>> import jax.numpy as jnp, clipchain
    >>> tx = clipchain.normalize(1.0)
    >>> g = {"w": jnp.array([0.3, 0.4])}
    >>> tx.update(g, tx.init(g))[0]["w"]
    Array([0.6, 0.8], dtype=float32)
    >>> tx = clipchain.normalize(1.0, stabilizer=0.01)
    >>> tx.update(g, tx.init(g))[0]["w"]
    Array([0.5882353 , 0.78431374], dtype=float32)

  References:
    Bu et al., `Automatic Clipping: Differentially Private Deep Learning Made Easier and Stronger
    <https://arxiv.org/abs/2206.07136>`_, 2023
  """
  return clip_norm(
    as_policy(norm, "norm"),
    granularity=as_granularity(granularity, stacked_axes),
    rule=Normalize(stabilizer),
    mask=mask,
    name=name,
    axis_name=axis_name,
  )

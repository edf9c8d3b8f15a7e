"""Normalising instead of capping: each group's norm is set to the threshold."""

from __future__ import annotations

import optax

from clipchain._src.clip_norm import ThresholdLike, as_policy, clip_norm
from clipchain._src.distributed import AxisName
from clipchain._src.granularity import GranularityLike


def normalize(
  norm: ThresholdLike = 1.0,
  *,
  granularity: GranularityLike = "global",
  stabilizer: float = 0.0,
  name: str = "normalize",
  axis_name: AxisName = None,
) -> optax.GradientTransformation:
  """Scales every group of the updates to norm ``norm``: ``g * norm / (‖g‖ + stabilizer)``.

  At the global granularity with ``stabilizer=0`` this is normalised gradient descent: the update's
  direction is kept and its length set. With a small ``stabilizer`` (0.01 in the paper) it is
  automatic clipping: a group much larger than the stabilizer comes out with norm ``norm``, a
  group much smaller is scaled by about ``norm / stabilizer``, never blown up from noise. A zero
  group stays zero. The preset of :func:`clipchain.clip_norm` with ``rule="normalize"``; the
  element granularity is refused (each value would become ``±norm``).

  Args:
    norm: the norm each group is set to (a number, a schedule or a policy).
    granularity: ``"global"``, ``"layer"``, ``"unit"`` or a :mod:`clipchain.granularity` object.
    stabilizer: added to each group's norm before dividing, a finite number >= 0.
    name: the name under which :func:`clipchain.stats` reports.
    axis_name: inside ``shard_map`` or ``pmap``, the mesh axis name(s) to measure norms across
      (see :func:`clipchain.clip_norm` and ``docs/distributed.md``).

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
    granularity=granularity,
    rule="normalize",
    stabilizer=stabilizer,
    name=name,
    axis_name=axis_name,
  )

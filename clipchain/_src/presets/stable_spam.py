"""Stable-SPAM's gradient side: AdaClip then AdaGN, two clips of the core in a row."""

from __future__ import annotations

import optax

from clipchain._src.clip_norm import clip_norm
from clipchain._src.distributed import AxisName
from clipchain._src.granularity import Element, Layer
from clipchain._src.masking import MaskLike
from clipchain._src.thresholds.stable_spam import MaxEMA, NormMoments
from clipchain._src.validation import check_bool, check_name


def stable_spam_clip(
  gamma1: float = 0.7,
  gamma2: float = 0.9,
  theta: float = 0.999,
  eps: float = 1e-8,
  *,
  clip_statistics: bool = False,
  mask: MaskLike = None,
  name: str = "stable_spam_clip",
  axis_name: AxisName = None,
) -> optax.GradientTransformation:
  """Stable-SPAM's clipping of the gradient: per tensor, AdaClip, then AdaGN.

  1. **AdaClip** (``{name}_adaclip``): the threshold of a tensor is the bias-corrected EMA
     (``theta``) of its largest ``|g|``, this step's included; values above it are multiplied by
     threshold / max ``|g|``. It is :func:`clipchain.clip_norm` with
     :class:`~clipchain.thresholds.MaxEMA` at the element granularity with ``rule="rescale"``.
  2. **AdaGN** (``{name}_adagn``): each tensor is scaled to the norm ``m̂ / (sqrt(v̂) + eps)``,
     ``m`` and ``v`` the EMAs (``gamma1``, ``gamma2``, bias-corrected) of its norm and squared
     norm after AdaClip. It is :func:`clipchain.clip_norm` with
     :class:`~clipchain.thresholds.NormMoments` at the layer granularity and ``rule="normalize"``.

  Equal to the reference (``galore_torch/stablespam.py``) step for step on finite gradients,
  except where the reference lets a non-finite step or a zero tensor into its EMAs (here they
  leave them alone). Stable-SPAM's momentum reset every ``update_proj_gap`` steps belongs to the
  optimizer and is not part of this transform; neither is its ``total_T`` cosine schedule of
  ``gamma1``. Place it before an Adam-family optimizer:
  ``optax.chain(clipchain.stable_spam_clip(), optax.adamw(lr))``.

  Args:
    gamma1: AdaGN's decay of the EMA of each tensor's norm, in ``[0, 1)``.
    gamma2: AdaGN's decay of the EMA of its squared norm, in ``[0, 1)``.
    theta: AdaClip's decay of the EMA of each tensor's largest magnitude, in ``[0, 1)``.
    eps: added to ``sqrt(v̂)`` in AdaGN, a finite number >= 0.
    clip_statistics: whether AdaClip also measures and reports its ``clipped_norm`` and
      ``clipped_fraction`` (see :func:`clipchain.clip`; static under
      ``optax.inject_hyperparams``).
    mask: as for :func:`clipchain.clip_norm`.
    name: the prefix of the two clips' names in :func:`clipchain.stats`.
    axis_name: as for :func:`clipchain.clip_norm`.

  Returns:
    An ``optax.GradientTransformation`` (``optax.chain`` of the two clips).

  Examples:
    >>> import jax.numpy as jnp, optax, clipchain
    >>> tx = clipchain.stable_spam_clip()
    >>> g = {"w": jnp.array([3.0, 4.0])}
    >>> updates, state = tx.update(g, tx.init(g))
    >>> updates["w"]  # first step: nothing above the max; the norm set to m̂ / sqrt(v̂) = 1
    Array([0.6, 0.8], dtype=float32)
    >>> sorted(k for k in clipchain.stats(state) if k.endswith("/norm"))
    ['stable_spam_clip_adaclip/norm', 'stable_spam_clip_adagn/norm']

  References:
    Huang et al., `Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam
    <https://arxiv.org/abs/2502.17055>`_, 2025
  """
  check_name(name)
  check_bool("clip_statistics", clip_statistics)
  return optax.chain(
    clip_norm(
      MaxEMA(theta),
      granularity=Element(clip_statistics=clip_statistics),
      rule="rescale",
      mask=mask,
      name=f"{name}_adaclip",
      axis_name=axis_name,
    ),
    clip_norm(
      NormMoments(gamma1, gamma2, eps),
      granularity=Layer(),
      rule="normalize",
      mask=mask,
      name=f"{name}_adagn",
      axis_name=axis_name,
    ),
  )

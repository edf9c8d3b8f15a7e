"""What is done with a group whose norm was measured: cap it at the threshold, or set it to it.

The third independent choice of :func:`clipchain.clip_norm`, beside the granularity (where a norm
is measured) and the threshold policy (how the threshold is set). A rule turns a group's norm and
threshold into the factor the group is scaled by; the granularity applies the factor. To add a
rule, subclass :class:`Rule` here.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from clipchain._src import norms
from clipchain._src.validation import check_non_negative, is_concrete


class Rule(abc.ABC):
  """Turns a group's norm and threshold into the factor that group is scaled by."""

  @abc.abstractmethod
  def factor(self, norm: jax.Array, threshold: jax.Array) -> jax.Array:
    """The scale of each group: finite at a zero norm and a zero threshold, NaN for a NaN norm."""

  @abc.abstractmethod
  def changes(self, norm: jax.Array, threshold: jax.Array) -> jax.Array:
    """True for each group the rule changes (``clipped_fraction`` counts them)."""


@dataclasses.dataclass(frozen=True)
class Clip(Rule):
  """Caps each group's norm at the threshold: the scale ``min(1, c / ‖g‖)``."""

  def factor(self, norm, threshold):
    return norms.clip_scale(norm, threshold)

  def changes(self, norm, threshold):
    return norms.exceeds(norm, threshold)


@dataclasses.dataclass(frozen=True)
class Normalize(Rule):
  """Sets each group's norm to the threshold: the scale ``c / (‖g‖ + stabilizer)``.

  A zero group stays zero. With ``stabilizer=0`` every non-zero group comes out with norm exactly
  ``c`` (normalised gradient descent at the global granularity; the LARS trust ratio at the layer
  granularity with :class:`~clipchain.thresholds.RelativeToParams`); with a small stabilizer, small
  groups are scaled up less (automatic clipping, Bu et al. 2023).

  Args:
    stabilizer: added to the norm before dividing, a finite number >= 0.
  """

  stabilizer: float = 0.0

  def __post_init__(self):
    check_non_negative("stabilizer", self.stabilizer)

  def factor(self, norm, threshold):
    denominator = norm + jnp.asarray(self.stabilizer, jnp.float32)
    # 0 for a zero group (and a zero denominator): scaling zero by anything leaves it zero, and
    # the gradient through the factor stays finite. A NaN norm gives a NaN factor.
    positive = denominator > 0
    factor = jnp.where(positive, threshold / jnp.where(positive, denominator, 1.0), 0.0)
    return jnp.where(jnp.isnan(denominator), denominator, factor)

  def changes(self, norm, threshold):
    return ~((norm == threshold) | (norm == 0))


#: The default rule.
CLIP = Clip()

RuleLike = Literal["clip", "normalize"] | Rule

RULES = ("clip", "normalize")


def as_rule(rule: RuleLike, stabilizer=0.0) -> Rule:
  """``"clip"`` or ``"normalize"`` (with ``stabilizer``), or a :class:`Rule`."""
  if isinstance(rule, Rule):
    return rule
  if isinstance(rule, str):
    if rule == "clip":
      check_non_negative("stabilizer", stabilizer)
      if is_concrete(stabilizer) and float(stabilizer) != 0.0:
        raise ValueError(
          f"stabilizer applies to rule='normalize' only; got stabilizer={stabilizer!r} with "
          "rule='clip'."
        )
      return CLIP
    if rule == "normalize":
      return Normalize(stabilizer)
    raise ValueError(f"rule must be one of {list(RULES)} or a clipchain.rules.Rule; got {rule!r}.")
  raise TypeError(
    f"rule must be a str ({list(RULES)}) or a clipchain.rules.Rule; got {rule!r} of type "
    f"{type(rule).__name__}."
  )

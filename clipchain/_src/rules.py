"""What is done with a measured group: cap it, rescale it, or set its norm to the threshold.

The third independent choice of :func:`clipchain.clip_norm`, beside the granularity (where a norm
is measured) and the threshold policy (how the threshold is set). A rule turns a group's norm and
threshold into the factor the group is scaled by; the granularity applies the factor. To add a
rule, subclass :class:`Rule` here.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar, Literal

import jax
import jax.numpy as jnp

from clipchain._src import norms
from clipchain._src.validation import check_non_negative


class Rule(abc.ABC):
  """Turns a group's norm and threshold into the factor that group is scaled by.

  A rule declares what it needs and does as class attributes, which the granularities read:

  Attributes:
    needs_largest: ``factor`` reads ``largest``, the largest norm among the groups measured
      together (a leaf's for the unit and element granularities, the whole tree's for the layer
      and global granularities); the granularity computes it, across devices, only then.
    changes_every_group: the rule changes every non-zero group, not only those above the
      threshold (normalising); a granularity whose groups are single values refuses it.
  """

  needs_largest: ClassVar[bool] = False
  changes_every_group: ClassVar[bool] = False

  @abc.abstractmethod
  def factor(self, norm: jax.Array, threshold: jax.Array, largest: jax.Array | None = None):
    """The scale of each group: finite at a zero norm and a zero threshold, NaN for a NaN norm."""

  @abc.abstractmethod
  def changes(self, norm: jax.Array, threshold: jax.Array) -> jax.Array:
    """True for each group the rule changes (``clipped_fraction`` counts them)."""


@dataclasses.dataclass(frozen=True)
class Clip(Rule):
  """Caps each group's norm at the threshold: the scale ``min(1, c / ‖g‖)``.

  At the element granularity this clamps each value to ``[-c, c]`` (exactly, as ``optax.clip``).
  """

  def factor(self, norm, threshold, largest=None):
    return norms.clip_scale(norm, threshold)

  def changes(self, norm, threshold):
    return norms.exceeds(norm, threshold)


@dataclasses.dataclass(frozen=True)
class Rescale(Rule):
  """Scales the groups above the threshold by ``c / (the largest norm measured with them)``.

  The groups over the threshold keep their order and the largest lands on ``c``: at the element
  granularity, a value above the threshold is multiplied by ``c / max|g|`` of its leaf
  (Stable-SPAM's AdaClip); at the layer granularity, a layer above it by ``c / ‖largest layer‖``.
  Groups at or below the threshold are left alone.
  """

  needs_largest: ClassVar[bool] = True

  def factor(self, norm, threshold, largest=None):
    if largest is None:
      raise ValueError("Rescale.factor needs the largest norm (largest=...).")
    over = norms.exceeds(norm, threshold)
    # Nothing is over the threshold when the largest norm is 0; the stand-in keeps jax.grad finite
    # there. A NaN norm makes the largest NaN, and the factor NaN where it is over (a NaN is).
    denominator = jnp.where(largest > 0, largest, jnp.where(jnp.isnan(largest), largest, 1.0))
    return jnp.where(over, threshold / denominator, 1.0)

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

  changes_every_group: ClassVar[bool] = True

  stabilizer: float = 0.0

  def __post_init__(self):
    check_non_negative("stabilizer", self.stabilizer)

  def factor(self, norm, threshold, largest=None):
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

RuleLike = Literal["clip", "rescale", "normalize"] | Rule

RULES: dict[str, type[Rule]] = {"clip": Clip, "rescale": Rescale, "normalize": Normalize}


def as_rule(rule: RuleLike) -> Rule:
  """``"clip"``, ``"rescale"`` or ``"normalize"`` (with its defaults), or a :class:`Rule`."""
  if isinstance(rule, Rule):
    return rule
  if isinstance(rule, str):
    if rule in RULES:
      return RULES[rule]()
    raise ValueError(
      f"rule must be one of {list(RULES)} or a clipchain.rules.Rule; got {rule!r} (a stabilizer "
      "goes with the rule: rule=clipchain.rules.Normalize(stabilizer=0.01))."
    )
  raise TypeError(
    f"rule must be a str ({list(RULES)}) or a clipchain.rules.Rule; got {rule!r} of type "
    f"{type(rule).__name__}."
  )

"""The threshold-policy interface: how the clip threshold is set, independently of where norms are
measured.

A policy sees the norms a granularity measured (a scalar, a per-layer vector, or per-unit/per-value
trees; see :mod:`clipchain.granularity`) and returns the threshold to clip them to, with its next
state. The core (:func:`clipchain.clip_norm`) does the rest: it applies the threshold, keeps the
statistics and makes sure a non-finite norm never reaches the policy's state.
"""

from __future__ import annotations

import abc
from typing import Any, NamedTuple

import jax

from clipchain._src.granularity import Granularity, Groups


class Context(NamedTuple):
  """What a policy may consult besides the norms.

  Attributes:
    count: the number of updates this transform has made before this one (int32).
    params: the ``params`` passed to ``update`` (``None`` when not given).
    groups: the static structure of the norms (granularity, layer names, shapes).
  """

  count: jax.Array
  params: Any
  groups: Groups

  @property
  def granularity(self) -> Granularity:
    return self.groups.granularity


class EmptyState(NamedTuple):
  """The state of a stateless policy."""


class ThresholdPolicy(abc.ABC):
  """How a clip threshold is set. Subclass it to write a new adaptive method.

  Subclasses implement :meth:`__call__` and, when they keep state, :meth:`init`; they may refuse a
  granularity where they are not meaningful in :meth:`check_granularity`. A state (a
  ``NamedTuple`` of arrays) that defines ``report(self) -> dict[str, jax.Array]`` has its internal
  estimates included in :func:`clipchain.stats`; per-layer vectors are keyed by layer.
  """

  def check_granularity(self, granularity: Granularity) -> None:  # noqa: B027
    """Raises ``ValueError`` (saying why) if this policy makes no sense at ``granularity``."""

  def init(self, groups: Groups) -> Any:
    """The initial state, fixed-shape float32/int32 arrays shaped after ``groups``."""
    del groups
    return EmptyState()

  @abc.abstractmethod
  def __call__(self, norms, state, context: Context) -> tuple[Any, Any]:
    """Returns ``(threshold, new_state)``; the threshold broadcasts against ``norms``."""

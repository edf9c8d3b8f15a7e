"""Where a norm is measured: the whole tree, each layer, each output unit, or each value.

To write a new granularity, subclass :class:`Slices` (one norm per slice of each leaf: say which
axes a slice spans) or :class:`Granularity` (any grouping: return :class:`Groups`,
:class:`Measured` and :class:`Summary`); see ``docs/extending.md``.
"""

from clipchain._src.granularity import (
  Element,
  Global,
  Granularity,
  Groups,
  Layer,
  Measured,
  Slices,
  Summary,
  Unit,
  broadcast_like,
  is_scalar,
)

__all__ = [
  "Element",
  "Global",
  "Granularity",
  "Groups",
  "Layer",
  "Measured",
  "Slices",
  "Summary",
  "Unit",
  "broadcast_like",
  "is_scalar",
]

"""Where a norm is measured: the whole tree, each layer (each slice of a stacked layer), each
output unit, or each value.

To write a new granularity, subclass :class:`Slices` (one norm per slice of each leaf: say which
axes a slice spans) or :class:`Granularity` (any grouping: return :class:`Groups`,
:class:`Measured` and :class:`Summary`); see ``docs/extending.md``. The helpers below are what the
built-in granularities are written with: leaves named the same whether Flax boxes them or not,
float32 sums of squares, and sums across the mesh axes a leaf is split over.
"""

from clipchain._src.distributed import max_across as max_across_devices
from clipchain._src.distributed import sum_across as sum_across_devices
from clipchain._src.distributed import total_across as total_across_devices
from clipchain._src.granularity import (
  Element,
  Global,
  Granularity,
  Groups,
  Layer,
  Measured,
  Slices,
  StackedLeaves,
  Summary,
  Unit,
  broadcast_like,
  is_scalar,
)
from clipchain._src.norms import safe_sqrt, scale, sum_of_squares
from clipchain._src.tree import NamedLeaf, named_leaves

__all__ = [
  "Element",
  "Global",
  "Granularity",
  "Groups",
  "Layer",
  "Measured",
  "NamedLeaf",
  "Slices",
  "StackedLeaves",
  "Summary",
  "Unit",
  "broadcast_like",
  "is_scalar",
  "max_across_devices",
  "named_leaves",
  "safe_sqrt",
  "scale",
  "sum_across_devices",
  "sum_of_squares",
  "total_across_devices",
]

"""Where a norm is measured: the whole tree, each layer, each output unit, or each value."""

from clipchain._src.granularity import Element, Global, Granularity, Groups, Layer, Unit

__all__ = ["Element", "Global", "Granularity", "Groups", "Layer", "Unit"]

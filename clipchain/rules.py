"""What is done with a measured group: cap its norm at the threshold, rescale the groups above it,
or set every group's norm to it.

To write a new rule, subclass :class:`Rule` (``factor`` and ``changes``); see ``docs/extending.md``.
"""

from clipchain._src.rules import Clip, Normalize, Rescale, Rule

__all__ = ["Clip", "Normalize", "Rescale", "Rule"]

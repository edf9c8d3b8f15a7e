"""What is done with a measured group: cap its norm at the threshold, or set it to the threshold.

To write a new rule, subclass :class:`Rule` (``factor`` and ``changes``); see ``docs/extending.md``.
"""

from clipchain._src.rules import Clip, Normalize, Rule

__all__ = ["Clip", "Normalize", "Rule"]

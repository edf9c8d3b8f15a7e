"""How a clip threshold is set: fixed, scheduled, or adapted to the norms seen so far.

Any policy can be given to :func:`clipchain.clip_norm` at any granularity where it makes sense.
To write a new one, subclass :class:`ThresholdPolicy`.
"""

from clipchain._src.thresholds.base import Context, EmptyState, ThresholdPolicy
from clipchain._src.thresholds.fixed import Fixed, Scheduled

__all__ = ["Context", "EmptyState", "Fixed", "Scheduled", "ThresholdPolicy"]

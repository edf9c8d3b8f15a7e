"""How a clip threshold is set: fixed, scheduled, or adapted to the norms seen so far.

Any policy can be given to :func:`clipchain.clip_norm` at any granularity where it makes sense.
To write a new one, subclass :class:`ThresholdPolicy`.
"""

from clipchain._src.thresholds.base import Context, EmptyState, ThresholdPolicy
from clipchain._src.thresholds.ema_ratio import EMARatio
from clipchain._src.thresholds.fixed import Fixed, Scheduled
from clipchain._src.thresholds.percentile import Percentile
from clipchain._src.thresholds.quantile import QuantileTracker
from clipchain._src.thresholds.relative import RelativeToParams
from clipchain._src.thresholds.second_moment import SecondMoment
from clipchain._src.thresholds.zscore import ZScore

__all__ = [
  "Context",
  "EMARatio",
  "EmptyState",
  "Fixed",
  "Percentile",
  "QuantileTracker",
  "RelativeToParams",
  "Scheduled",
  "SecondMoment",
  "ThresholdPolicy",
  "ZScore",
]

"""How a clip threshold is set: fixed, scheduled, or adapted to the norms seen so far.

Any policy can be given to :func:`clipchain.clip_norm` at any granularity where it makes sense.
To write a new one, subclass :class:`ThresholdPolicy` (see ``docs/extending.md``): it works
elementwise over the norms pytree with :func:`map_groups`, creates its state with
:func:`zeros_like_norms` and leaves a group whose norm is zero alone with :func:`where_observed`.
"""

from clipchain._src.thresholds.base import (
  Context,
  EmptyState,
  ThresholdPolicy,
  map_groups,
  where_observed,
  zeros_like_norms,
)
from clipchain._src.thresholds.ema_ratio import EMARatio, EMARatioState
from clipchain._src.thresholds.fixed import Fixed, Scheduled
from clipchain._src.thresholds.percentile import Percentile, PercentileState
from clipchain._src.thresholds.quantile import QuantileTracker, QuantileTrackerState
from clipchain._src.thresholds.relative import RelativeToParams
from clipchain._src.thresholds.second_moment import SecondMoment, SecondMomentState
from clipchain._src.thresholds.stable_spam import (
  MaxEMA,
  MaxEMAState,
  NormMoments,
  NormMomentsState,
)
from clipchain._src.thresholds.zscore import ZScore, ZScoreState

__all__ = [
  "Context",
  "EMARatio",
  "EMARatioState",
  "EmptyState",
  "Fixed",
  "MaxEMA",
  "MaxEMAState",
  "NormMoments",
  "NormMomentsState",
  "Percentile",
  "PercentileState",
  "QuantileTracker",
  "QuantileTrackerState",
  "RelativeToParams",
  "Scheduled",
  "SecondMoment",
  "SecondMomentState",
  "ThresholdPolicy",
  "ZScore",
  "ZScoreState",
  "map_groups",
  "where_observed",
  "zeros_like_norms",
]

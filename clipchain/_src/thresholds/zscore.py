"""ZClip's threshold: an EMA of the norm's mean and variance, and a z-score test for spikes."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from clipchain._src import norms as norms_lib
from clipchain._src.granularity import Granularity, Groups
from clipchain._src.thresholds.base import (
  Context,
  ThresholdPolicy,
  map_groups,
  where_observed,
  zeros_like_norms,
)
from clipchain._src.validation import (
  check_bool,
  check_choice,
  check_int,
  check_non_negative,
  check_number,
)


class ZScoreState(NamedTuple):
  """State of :class:`ZScore`; each field is a pytree shaped like the norms (one entry per group).

  Attributes:
    mean: during the group's warmup the running mean of its norms, then their EMA.
    var: during the group's warmup the running population variance, then the EMA of the squared
      deviation from the mean.
    z: the z-score of the group's last norm (0 during its warmup).
    spike: 1.0 where the group's last norm was a spike, else 0.0.
    warmup_remaining: how many positive norms the group's warmup still needs (int32).
  """

  mean: Any
  var: Any
  z: Any
  spike: Any
  warmup_remaining: Any


@dataclasses.dataclass(frozen=True)
class ZScore(ThresholdPolicy):
  """ZClip's adaptive threshold: clip a norm that is a z-score outlier of its recent history.

  Every group keeps its own statistics. Its first ``warmup_steps`` positive norms give a running
  mean and population variance (Welford's update, no buffer); when the warmup is over they start
  two exponential moving averages (EMAs), ``mean`` and ``var``. Until then only ``max_grad_norm``
  (if set) clips the group. After the warmup, with ``std = sqrt(var)``, the norm
  ``G`` has the z-score ``z = (G - mean) / (std + eps)``, and

  * ``mode="zscore"``: a spike is ``z > z_thresh``; it is clipped to
    ``c = (mean + z_thresh * std / (z / z_thresh)) * clip_factor``
    (``clip_option="adaptive_scaling"``, which clips larger outliers harder) or to ``c = mean``
    (``clip_option="mean"``);
  * ``mode="percentile"``: a spike is ``G > mean + z_thresh * std``, clipped to that value
    (``clip_option`` and ``clip_factor`` are not used).

  The threshold is ``min(c if spike else G, max_grad_norm)``. The EMAs are then updated with
  ``x = c`` on a spike, else ``G`` (not capped by ``max_grad_norm``):
  ``mean <- alpha * mean + (1 - alpha) * x``, then
  ``var <- alpha * var + (1 - alpha) * (x - mean)**2`` with the updated mean; with
  ``skip_update_on_spike`` a spike leaves them unchanged. A non-finite norm changes nothing
  (:func:`clipchain.clip_norm` keeps the policy state), and neither does a group's zero norm (a
  frozen or unused layer, a unit without gradient): it neither counts towards the group's warmup
  nor enters its EMAs, so a group that had no gradient through the warmup is not clipped to 0
  when its gradient comes back; it starts its own warmup then.

  This is the reference package ``zclip`` 1.0.0 step by step, in float32 (it computes in float64;
  the warmup's mean and variance agree to float32 rounding), except that a clipped group is scaled
  by ``c / G`` where ``zclip`` (like ``torch.nn.utils.clip_grad_norm_``) uses ``c / (G + 1e-6)``:
  a relative difference of ``1e-6 / G``.

  At the global granularity this is ZClip; at the layer granularity every layer keeps its own
  statistics (one ZClip per layer); at the unit granularity every unit does. A granularity with
  one group per value is refused: a z-score of each ``|g|`` is what :class:`SecondMoment` (SPAM)
  does.

  Args:
    alpha: the EMA decay, in (0, 1).
    z_thresh: the z-score above which a norm is a spike (percentile mode: the number of standard
      deviations above the mean to clip at), > 0.
    max_grad_norm: a fixed upper bound on the threshold at every step, warmup included, or
      ``None`` for no bound.
    eps: added to ``std`` in the z-score, >= 0.
    warmup_steps: the number of positive norms each group collects before its statistics start.
    mode: ``"zscore"`` or ``"percentile"``.
    clip_option: with ``mode="zscore"``, ``"adaptive_scaling"`` or ``"mean"``.
    clip_factor: multiplies the adaptive-scaling threshold (mean included), > 0.
    skip_update_on_spike: leave the statistics unchanged on a spike.

  Examples:
    >>> import jax.numpy as jnp, clipchain
    >>> policy = clipchain.thresholds.ZScore(warmup_steps=3, max_grad_norm=None)
    >>> tx = clipchain.clip_norm(policy, name="zclip")
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> for g in [1.0, 1.2, 0.8, 10.0]:
    ...   updates, state = tx.update({"w": jnp.array([g, 0.0])}, state)
    >>> s = clipchain.stats(state)
    >>> round(float(s["zclip/z"]), 1), round(float(s["zclip/threshold"]), 3)
    (55.1, 1.019)

  References:
    Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
    <https://arxiv.org/abs/2504.02507>`_, 2025
  """

  alpha: float = 0.97
  z_thresh: float = 2.5
  max_grad_norm: float | None = 1.0
  eps: float = 1e-6
  warmup_steps: int = 25
  mode: Literal["zscore", "percentile"] = "zscore"
  clip_option: Literal["adaptive_scaling", "mean"] = "adaptive_scaling"
  clip_factor: float = 1.0
  skip_update_on_spike: bool = False

  def __post_init__(self):
    check_number("alpha", self.alpha, low=0.0, high=1.0, low_open=True, high_open=True)
    check_number("z_thresh", self.z_thresh, low=0.0, low_open=True)
    if self.max_grad_norm is not None:
      check_number("max_grad_norm", self.max_grad_norm, low=0.0, low_open=True)
    check_non_negative("eps", self.eps)
    check_int("warmup_steps", self.warmup_steps, minimum=1)
    check_choice("mode", self.mode, ("zscore", "percentile"))
    check_choice("clip_option", self.clip_option, ("adaptive_scaling", "mean"))
    check_number("clip_factor", self.clip_factor, low=0.0, low_open=True)
    check_bool("skip_update_on_spike", self.skip_update_on_spike)

  def check_granularity(self, granularity: Granularity) -> None:
    if granularity.one_group_per_value:
      raise ValueError(
        f"ZScore keeps a mean and a variance per group of values; at {granularity!r} every "
        "value is its own group, and a z-score of each |g| is what SPAM's "
        "clipchain.thresholds.SecondMoment does: use it, or ZScore at the 'global', 'layer' or "
        "'unit' granularity."
      )

  def init(self, groups: Groups) -> ZScoreState:
    return ZScoreState(
      mean=zeros_like_norms(groups),
      var=zeros_like_norms(groups),
      z=zeros_like_norms(groups),
      spike=zeros_like_norms(groups),
      warmup_remaining=zeros_like_norms(groups, jnp.int32, fill=self.warmup_steps),
    )

  def __call__(self, norms, state: ZScoreState, context: Context):
    threshold, *fields = map_groups(self._step, 6, norms, *state)
    return threshold, ZScoreState(*fields)

  def _step(self, norm, mean, var, z, spike, remaining):
    """One ZClip step on an array of norms; every entry is an independent ZClip."""
    del z, spike
    norm = jnp.asarray(norm, jnp.float32)
    warmup = remaining > 0

    # Warmup: a running mean and population variance of the positive norms (Welford).
    seen = (jnp.asarray(self.warmup_steps, jnp.int32) - remaining).astype(jnp.float32)
    delta = norm - mean
    running_mean = mean + delta / (seen + 1.0)
    running_var = var + (delta * (norm - running_mean) - var) / (seen + 1.0)

    # After the warmup: a z-score test against the statistics so far.
    std = norms_lib.safe_sqrt(var)
    z = (norm - mean) / (std + self.eps)
    if self.mode == "percentile":
      clip = mean + self.z_thresh * std
      is_spike = norm > clip
    else:
      is_spike = z > self.z_thresh
      if self.clip_option == "mean":
        clip = mean
      else:
        # z / z_thresh > 1 on a spike; elsewhere the value is unused but must not be NaN.
        eta = jnp.where(is_spike, z, self.z_thresh) / self.z_thresh
        clip = (mean + self.z_thresh * std / eta) * self.clip_factor
    is_spike = is_spike & ~warmup
    # The EMAs take the adaptive threshold on a spike, else the norm: never max_grad_norm.
    adaptive = jnp.where(is_spike, clip, norm)
    ema_mean = self.alpha * mean + (1 - self.alpha) * adaptive
    ema_var = self.alpha * var + (1 - self.alpha) * jnp.square(adaptive - ema_mean)
    keep = is_spike if self.skip_update_on_spike else jnp.zeros_like(is_spike)
    new_mean = jnp.where(warmup, running_mean, jnp.where(keep, mean, ema_mean))
    new_var = jnp.where(warmup, running_var, jnp.where(keep, var, ema_var))
    new_remaining = jnp.maximum(remaining - 1, 0)

    threshold = adaptive
    if self.max_grad_norm is not None:
      threshold = jnp.minimum(threshold, jnp.asarray(self.max_grad_norm, jnp.float32))
    new = (new_mean, new_var, jnp.where(warmup, 0.0, z), is_spike.astype(jnp.float32))
    new = where_observed(
      norm, (*new, new_remaining), (mean, var, jnp.zeros_like(z), jnp.zeros_like(z), remaining)
    )
    return (threshold, *new)

  def statistics(self, state: ZScoreState) -> dict[str, Any]:
    """``mean``, ``std``, ``z``, ``spike`` (per layer, or averaged over units: the fraction of
    units that spiked) and ``warmup_remaining``."""
    return {
      "mean": state.mean,
      "std": jax.tree.map(norms_lib.safe_sqrt, state.var),
      "z": state.z,
      "spike": state.spike,
      "warmup_remaining": jax.tree.map(lambda r: r.astype(jnp.float32), state.warmup_remaining),
    }

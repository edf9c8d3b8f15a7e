"""ZClip's threshold: an EMA of the norm's mean and variance, and a z-score test for spikes."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from clipchain._src import norms as norms_lib
from clipchain._src.granularity import Granularity, Groups
from clipchain._src.thresholds.base import Context, ThresholdPolicy
from clipchain._src.validation import (
  check_choice,
  check_in_range,
  check_non_negative,
  check_positive_int,
)


class ZScoreState(NamedTuple):
  """State of :class:`ZScore`.

  Each statistic has the shape of the norms: a scalar (global granularity), a vector of one entry
  per layer (layer granularity), or, with the unit granularity, a tuple with one flat vector of
  one entry per unit for each leaf.

  Attributes:
    buffer: the first ``warmup_steps`` norms, stacked along a new leading axis (kept, unused, after
      the warmup: the state has a fixed shape).
    mean: the EMA of the norm (0 until the warmup ends).
    var: the EMA of the squared deviation from the mean (0 until the warmup ends).
    z: the z-score of the last norm (0 during the warmup).
    spike: 1.0 where the last norm was a spike, else 0.0.
    warmup_remaining: how many norms the warmup still needs (int32; 0 once the statistics have
      started).
  """

  buffer: Any
  mean: Any
  var: Any
  z: Any
  spike: Any
  warmup_remaining: jax.Array

  def report(self) -> dict[str, jax.Array]:
    """``mean``, ``std``, ``z``, ``spike`` and ``warmup_remaining``; with the unit granularity
    each statistic is averaged over units (``spike`` is then the fraction of units that spiked)."""
    out = {}
    for key, value in (
      ("mean", self.mean),
      ("std", jax.tree.map(norms_lib.safe_sqrt, self.var)),
      ("z", self.z),
      ("spike", self.spike),
    ):
      out[key] = _average_units(value) if isinstance(value, tuple) else value
    out["warmup_remaining"] = self.warmup_remaining
    return out


def _average_units(leaves: tuple[jax.Array, ...]) -> jax.Array:
  """The mean over units of per-leaf unit vectors (along their last axis: a state may be stacked
  or batched on leading axes)."""
  count = sum(x.shape[-1] for x in leaves)
  if not count:
    return jnp.zeros((), jnp.float32)
  return sum(jnp.sum(x, axis=-1) for x in leaves) / count


class ZScore(ThresholdPolicy):
  """ZClip's adaptive threshold: clip a norm that is a z-score outlier of its recent history.

  The first ``warmup_steps`` norms are collected; when the buffer is full their mean and
  population variance start two exponential moving averages (EMAs), ``mean`` and ``var``. Until
  then only ``max_grad_norm`` (if set) clips. After the warmup, with ``std = sqrt(var)``, the norm
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
  (:func:`clipchain.clip_norm` keeps the policy state).

  This is the reference package ``zclip`` 1.0.0 step by step, in float32 (it computes in float64),
  except that a clipped group is scaled by ``c / G`` where ``zclip`` (like
  ``torch.nn.utils.clip_grad_norm_``) uses ``c / (G + 1e-6)``: a relative difference of
  ``1e-6 / G``.

  At the global granularity this is ZClip; at the layer granularity every layer keeps its own
  statistics (one ZClip per layer); at the unit granularity every unit does. The element
  granularity is refused: a z-score of each ``|g|`` is what :class:`SecondMoment` (SPAM) does.

  Args:
    alpha: the EMA decay, in (0, 1).
    z_thresh: the z-score above which a norm is a spike (percentile mode: the number of standard
      deviations above the mean to clip at), > 0.
    max_grad_norm: a fixed upper bound on the threshold at every step, warmup included, or
      ``None`` for no bound.
    eps: added to ``std`` in the z-score, >= 0.
    warmup_steps: the number of norms collected before the statistics start.
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

  def __init__(
    self,
    alpha: float = 0.97,
    z_thresh: float = 2.5,
    max_grad_norm: float | None = 1.0,
    eps: float = 1e-6,
    warmup_steps: int = 25,
    mode: str = "zscore",
    clip_option: str = "adaptive_scaling",
    clip_factor: float = 1.0,
    skip_update_on_spike: bool = False,
  ):
    check_in_range("alpha", alpha, 0.0, 1.0, low_open=True, high_open=True)
    check_in_range("z_thresh", z_thresh, 0.0, math.inf, low_open=True, high_open=True)
    if max_grad_norm is not None:
      check_in_range("max_grad_norm", max_grad_norm, 0.0, math.inf, low_open=True, high_open=True)
    check_non_negative("eps", eps)
    check_positive_int("warmup_steps", warmup_steps)
    check_choice("mode", mode, ("zscore", "percentile"))
    check_choice("clip_option", clip_option, ("adaptive_scaling", "mean"))
    check_in_range("clip_factor", clip_factor, 0.0, math.inf, low_open=True, high_open=True)
    if not isinstance(skip_update_on_spike, bool):
      raise ValueError(f"skip_update_on_spike must be a bool; got {skip_update_on_spike!r}.")
    self.alpha = alpha
    self.z_thresh = z_thresh
    self.max_grad_norm = max_grad_norm
    self.eps = eps
    self.warmup_steps = warmup_steps
    self.mode = mode
    self.clip_option = clip_option
    self.clip_factor = clip_factor
    self.skip_update_on_spike = skip_update_on_spike

  def check_granularity(self, granularity: Granularity) -> None:
    if granularity.name == "element":
      raise ValueError(
        "ZScore keeps a warmup buffer, a mean and a variance per group of values; per value "
        "(granularity='element') that is a z-score of each |g|, which is what SPAM's "
        "clipchain.thresholds.SecondMoment does: use it, or ZScore at the 'global', 'layer' or "
        "'unit' granularity."
      )

  def init(self, groups: Groups) -> ZScoreState:
    unit = groups.granularity.name == "unit"

    def zeros(shape=()):
      leaves = jax.tree.leaves(groups.norms)
      return tuple(jnp.zeros(shape + ((s.size,) if unit else s.shape), jnp.float32) for s in leaves)

    unpack = (lambda t: t) if unit else (lambda t: t[0])
    return ZScoreState(
      buffer=unpack(zeros((self.warmup_steps,))),
      mean=unpack(zeros()),
      var=unpack(zeros()),
      z=unpack(zeros()),
      spike=unpack(zeros()),
      warmup_remaining=jnp.full((), self.warmup_steps, jnp.int32),
    )

  def __call__(self, norms, state: ZScoreState, context: Context):
    if isinstance(state.mean, tuple):  # unit granularity: statistics per leaf, units flattened
      leaves, treedef = jax.tree.flatten(norms)
      steps = [
        self._step(jnp.ravel(x), *args, state.warmup_remaining)
        for x, *args in zip(leaves, state.buffer, state.mean, state.var)
      ]
      thresholds = [s[0].reshape(jnp.shape(x)) for s, x in zip(steps, leaves)]
      threshold = jax.tree.unflatten(treedef, thresholds)
      fields = [tuple(s[i] for s in steps) for i in range(1, 6)]
    else:
      threshold, *fields = self._step(
        norms, state.buffer, state.mean, state.var, state.warmup_remaining
      )
    remaining = jnp.maximum(state.warmup_remaining - 1, 0)
    return threshold, ZScoreState(*fields, warmup_remaining=remaining)

  def _step(self, norm, buffer, mean, var, remaining):
    """One ZClip step on an array of norms; every entry is an independent ZClip."""
    norm = jnp.asarray(norm, jnp.float32)
    warmup = remaining > 0

    # Warmup: store the norm; the step that fills the buffer starts the statistics.
    slot = jnp.minimum(self.warmup_steps - remaining, self.warmup_steps - 1)
    buffer = buffer.at[slot].set(jnp.where(warmup, norm, buffer[slot]))
    start = remaining == 1
    start_mean = jnp.mean(buffer, axis=0)
    start_var = jnp.mean(jnp.square(buffer - start_mean), axis=0)

    # After the warmup: a z-score test against the statistics so far.
    std = norms_lib.safe_sqrt(var)
    z = (norm - mean) / (std + self.eps)
    if self.mode == "percentile":
      clip = mean + self.z_thresh * std
      spike = norm > clip
    else:
      spike = z > self.z_thresh
      if self.clip_option == "mean":
        clip = mean
      else:
        # z / z_thresh > 1 on a spike; elsewhere the value is unused but must not be NaN.
        eta = jnp.where(spike, z, self.z_thresh) / self.z_thresh
        clip = (mean + self.z_thresh * std / eta) * self.clip_factor
    spike = spike & ~warmup
    # The EMAs take the adaptive threshold on a spike, else the norm: never max_grad_norm.
    adaptive = jnp.where(spike, clip, norm)
    ema_mean = self.alpha * mean + (1 - self.alpha) * adaptive
    ema_var = self.alpha * var + (1 - self.alpha) * jnp.square(adaptive - ema_mean)
    keep = warmup | spike if self.skip_update_on_spike else warmup
    new_mean = jnp.where(start, start_mean, jnp.where(keep, mean, ema_mean))
    new_var = jnp.where(start, start_var, jnp.where(keep, var, ema_var))

    threshold = adaptive
    if self.max_grad_norm is not None:
      threshold = jnp.minimum(threshold, jnp.asarray(self.max_grad_norm, jnp.float32))
    z = jnp.where(warmup, 0.0, z)
    return threshold, buffer, new_mean, new_var, z, spike.astype(jnp.float32)

  def __repr__(self) -> str:
    return (
      f"ZScore(alpha={self.alpha!r}, z_thresh={self.z_thresh!r}, "
      f"max_grad_norm={self.max_grad_norm!r}, eps={self.eps!r}, "
      f"warmup_steps={self.warmup_steps!r}, mode={self.mode!r}, "
      f"clip_option={self.clip_option!r}, clip_factor={self.clip_factor!r}, "
      f"skip_update_on_spike={self.skip_update_on_spike!r})"
    )

"""A threshold that tracks a quantile of the norms with a geometric update (Andrew et al. 2021)."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from clipchain._src.granularity import Granularity, Groups
from clipchain._src.thresholds.base import (
  Context,
  ThresholdPolicy,
  where_observed,
  zeros_like_norms,
)
from clipchain._src.validation import check_number, is_concrete

# C is kept at or above the smallest normal float32: a tracker that underflowed to 0 could never
# grow again (0 * exp(x) = 0).
_SMALLEST_THRESHOLD = float(jnp.finfo(jnp.float32).tiny)


class QuantileTrackerState(NamedTuple):
  """State of :class:`QuantileTracker`.

  Attributes:
    quantile: the running estimate ``C`` of the target quantile of the norms, the threshold of
      the next update, a pytree shaped like the norms (float32).
  """

  quantile: Any


@dataclasses.dataclass(frozen=True)
class QuantileTracker(ThresholdPolicy):
  """Tracks the ``target_quantile`` of the norms online and clips to it.

  The threshold of update ``t`` is the current estimate ``C_t``; after the update it moves
  geometrically towards the quantile: with ``b_t = 1[‖g_t‖ <= C_t]``,
  ``C_{t+1} = C_t · exp(-learning_rate · (b_t - target_quantile))``, then clamped to
  ``[min_threshold, max_threshold]`` when given. ``C`` shrinks while norms stay below it and
  grows while they exceed it, and settles where a fraction ``target_quantile`` of the norms is
  unclipped. A streaming AutoClip in O(1) memory: one number per group (the tree, each layer or
  each unit). A step whose norm is not finite leaves ``C`` unchanged, and so does a group's zero
  norm (a frozen or unused layer): it says nothing about the group's scale, and a run of them
  would drift ``C`` towards 0, where the group's gradient would be clipped to nothing when it comes
  back. ``C`` never goes below the smallest normal float32 (``1.2e-38``), from where it can grow.

  Args:
    target_quantile: the fraction of updates left unclipped at equilibrium, in ``[0, 1]``.
    learning_rate: the step size of the geometric update (``η``), a finite number > 0.
    initial_threshold: ``C_0``, a finite number > 0.
    min_threshold: if given, ``C`` never goes below it (finite, >= 0).
    max_threshold: if given, ``C`` never goes above it (> 0, may be ``inf``).

  Examples:
    >>> import jax.numpy as jnp, clipchain
    >>> policy = clipchain.thresholds.QuantileTracker(0.5, initial_threshold=1.0)
    >>> tx = clipchain.clip_norm(policy)
    >>> g = {"w": jnp.array([3.0, 4.0])}
    >>> u, state = tx.update(g, tx.init(g))
    >>> u["w"]
    Array([0.6, 0.8], dtype=float32)
    >>> state.policy_state.quantile  # exp(0.2 * 0.5): the norm 5 was above C = 1
    Array(1.105171, dtype=float32)

  References:
    Andrew et al., `Differentially Private Learning with Adaptive Clipping
    <https://arxiv.org/abs/1905.03871>`_, 2021
  """

  target_quantile: float = 0.5
  learning_rate: float = 0.2
  initial_threshold: float = 0.1
  _: dataclasses.KW_ONLY
  min_threshold: float | None = None
  max_threshold: float | None = None

  def __post_init__(self):
    check_number("target_quantile", self.target_quantile, low=0.0, high=1.0)
    check_number("learning_rate", self.learning_rate, low=0.0, low_open=True)
    check_number("initial_threshold", self.initial_threshold, low=0.0, low_open=True)
    if self.min_threshold is not None:
      check_number("min_threshold", self.min_threshold, low=0.0)
    if self.max_threshold is not None:
      check_number("max_threshold", self.max_threshold, low=0.0, low_open=True, allow_inf=True)
    low = 0.0 if self.min_threshold is None else self.min_threshold
    high = jnp.inf if self.max_threshold is None else self.max_threshold
    if is_concrete((low, self.initial_threshold, high)) and not (
      low <= self.initial_threshold <= high
    ):
      raise ValueError(
        "QuantileTracker needs min_threshold <= initial_threshold <= max_threshold; got "
        f"min_threshold={self.min_threshold!r}, initial_threshold={self.initial_threshold!r}, "
        f"max_threshold={self.max_threshold!r}."
      )

  def check_granularity(self, granularity: Granularity) -> None:
    if granularity.one_group_per_value:
      raise ValueError(
        f"QuantileTracker cannot track a quantile per value ({granularity!r} makes every value a "
        "group): a value's magnitude is not a sample from one distribution across steps, so a "
        "per-value quantile means nothing and would cost one tracker per parameter. Use a "
        "'global', 'layer' or 'unit' granularity, or thresholds.SecondMoment to clip per-value "
        "spikes."
      )

  def _clamp(self, c: jax.Array) -> jax.Array:
    if self.min_threshold is not None:
      c = jnp.maximum(c, jnp.asarray(self.min_threshold, jnp.float32))
    if self.max_threshold is not None:
      c = jnp.minimum(c, jnp.asarray(self.max_threshold, jnp.float32))
    return c

  def init(self, groups: Groups) -> QuantileTrackerState:
    return QuantileTrackerState(zeros_like_norms(groups, fill=self.initial_threshold))

  def __call__(self, norms, state: QuantileTrackerState, context: Context):
    rate = jnp.asarray(self.learning_rate, jnp.float32)
    target = jnp.asarray(self.target_quantile, jnp.float32)

    def step(norm, c):
      unclipped = (norm <= c).astype(jnp.float32)
      new = self._clamp(c * jnp.exp(-rate * (unclipped - target)))
      new = jnp.maximum(new, _SMALLEST_THRESHOLD).astype(jnp.float32)
      return where_observed(norm, new, c)

    return state.quantile, QuantileTrackerState(jax.tree.map(step, norms, state.quantile))

  def statistics(self, state: QuantileTrackerState) -> dict[str, Any]:
    del state  # C is the threshold, which is reported already.
    return {}

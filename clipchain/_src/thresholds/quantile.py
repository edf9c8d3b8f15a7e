"""A threshold that tracks a quantile of the norms with a geometric update (Andrew et al. 2021)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from clipchain._src.granularity import Granularity, Groups
from clipchain._src.thresholds.base import Context, ThresholdPolicy
from clipchain._src.validation import check_in_range, is_concrete


class QuantileTrackerState(NamedTuple):
  """State of :class:`QuantileTracker`.

  Attributes:
    quantile: the running estimate ``C`` of the target quantile of the norms, the threshold of
      the next update: a float32 scalar (global), one per layer, or a tree of one per unit.
  """

  quantile: Any


class QuantileTracker(ThresholdPolicy):
  """Tracks the ``target_quantile`` of the norms online and clips to it.

  The threshold of update ``t`` is the current estimate ``C_t``; after the update it moves
  geometrically towards the quantile: with ``b_t = 1[‖g_t‖ <= C_t]``,
  ``C_{t+1} = C_t · exp(-learning_rate · (b_t - target_quantile))``, then clamped to
  ``[min_threshold, max_threshold]`` when given. ``C`` shrinks while norms stay below it and
  grows while they exceed it, and settles where a fraction ``target_quantile`` of the norms is
  unclipped. A streaming AutoClip in O(1) memory: one number per group (the tree, each layer or
  each unit). A step whose norm is not finite leaves ``C`` unchanged.

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

  def __init__(
    self,
    target_quantile=0.5,
    learning_rate=0.2,
    initial_threshold=0.1,
    *,
    min_threshold=None,
    max_threshold=None,
  ):
    check_in_range("target_quantile", target_quantile, 0.0, 1.0)
    check_in_range("learning_rate", learning_rate, 0.0, math.inf, low_open=True, high_open=True)
    check_in_range(
      "initial_threshold", initial_threshold, 0.0, math.inf, low_open=True, high_open=True
    )
    if min_threshold is not None:
      check_in_range("min_threshold", min_threshold, 0.0, math.inf, high_open=True)
    if max_threshold is not None:
      check_in_range("max_threshold", max_threshold, 0.0, math.inf, low_open=True)
    low = -math.inf if min_threshold is None else min_threshold
    high = math.inf if max_threshold is None else max_threshold
    if is_concrete((low, initial_threshold, high)) and not low <= initial_threshold <= high:
      raise ValueError(
        "QuantileTracker needs min_threshold <= initial_threshold <= max_threshold; got "
        f"min_threshold={min_threshold!r}, initial_threshold={initial_threshold!r}, "
        f"max_threshold={max_threshold!r}."
      )
    self.target_quantile = target_quantile
    self.learning_rate = learning_rate
    self.initial_threshold = initial_threshold
    self.min_threshold = min_threshold
    self.max_threshold = max_threshold

  def check_granularity(self, granularity: Granularity) -> None:
    if granularity.name == "element":
      raise ValueError(
        "QuantileTracker cannot track a quantile per value (granularity='element'): a value's "
        "magnitude is not a sample from one distribution across steps, so a per-value quantile "
        "means nothing and would cost one tracker per parameter. Use a 'global', 'layer' or "
        "'unit' granularity, or thresholds.SecondMoment to clip per-value spikes."
      )

  def _clamp(self, c: jax.Array) -> jax.Array:
    if self.min_threshold is not None:
      c = jnp.maximum(c, jnp.asarray(self.min_threshold, jnp.float32))
    if self.max_threshold is not None:
      c = jnp.minimum(c, jnp.asarray(self.max_threshold, jnp.float32))
    return c

  def init(self, groups: Groups) -> QuantileTrackerState:
    initial = jnp.asarray(self.initial_threshold, jnp.float32)
    return QuantileTrackerState(
      jax.tree.map(lambda s: jnp.full(s.shape, initial, jnp.float32), groups.norms)
    )

  def __call__(self, norms, state: QuantileTrackerState, context: Context):
    rate = jnp.asarray(self.learning_rate, jnp.float32)
    target = jnp.asarray(self.target_quantile, jnp.float32)

    def step(norm, c):
      unclipped = (norm <= c).astype(jnp.float32)
      return self._clamp(c * jnp.exp(-rate * (unclipped - target))).astype(jnp.float32)

    return state.quantile, QuantileTrackerState(jax.tree.map(step, norms, state.quantile))

  def __repr__(self) -> str:
    return (
      f"QuantileTracker(target_quantile={self.target_quantile!r}, "
      f"learning_rate={self.learning_rate!r}, initial_threshold={self.initial_threshold!r}, "
      f"min_threshold={self.min_threshold!r}, max_threshold={self.max_threshold!r})"
    )

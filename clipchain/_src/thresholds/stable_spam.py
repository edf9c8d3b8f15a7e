"""Stable-SPAM's two thresholds: an EMA of each tensor's largest value, and a ratio of norm moments.

Stable-SPAM's gradient side (Huang et al. 2025) is two clips in a row, each a policy of the core:
``MaxEMA`` at the element granularity with the rescale rule (AdaClip: values above the EMA of the
tensor's largest magnitude are rescaled) and ``NormMoments`` at the layer granularity with the
normalize rule (AdaGN: each tensor set to a norm from the moments of its past norms).
:func:`clipchain.stable_spam_clip` chains them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from clipchain._src import distributed
from clipchain._src.granularity import Granularity, Groups
from clipchain._src.norms import safe_sqrt
from clipchain._src.thresholds.base import (
  Context,
  ThresholdPolicy,
  map_groups,
  where_observed,
  zeros_like_norms,
)
from clipchain._src.validation import check_number


class MaxEMAState(NamedTuple):
  """State of :class:`MaxEMA`.

  Attributes:
    ema: the EMA of the largest norm of each leaf (one per leaf at the unit and element
      granularities, one per group otherwise), float32, not bias-corrected.
    steps: how many norms entered each EMA (int32): its bias correction.
  """

  ema: Any
  steps: Any


def _per_leaf(granularity: Granularity) -> bool:
  # At granularities whose groups are slices of a leaf, the EMA follows the leaf's largest norm.
  return granularity.groups_grow_with_size


@dataclasses.dataclass(frozen=True)
class MaxEMA(ThresholdPolicy):
  """The threshold: a bias-corrected EMA of each leaf's largest norm, this step's included.

  At the element granularity a value's norm is its magnitude, so the threshold of a tensor is the
  EMA of its largest ``|g|`` (Stable-SPAM's AdaClip, with ``theta`` its ``gamma3``):
  ``m ← theta · m + (1 - theta) · max|g|``, threshold ``m / (1 - theta^t)``. On the first step the
  threshold is the tensor's own maximum, so nothing is clipped. At the unit granularity it follows
  each leaf's largest unit norm; at the layer and global granularities, each group's norm.

  A leaf whose largest norm is zero (no gradient) leaves its EMA and step count alone, and a step
  whose tree norm is not finite leaves the whole state alone (:func:`clipchain.clip_norm`); the
  reference updates the EMA in both cases.

  Args:
    theta: the EMA's decay, in ``[0, 1)``.

  Examples:
    >>> import jax.numpy as jnp, clipchain
    >>> tx = clipchain.clip_norm(clipchain.thresholds.MaxEMA(0.5), granularity="element",
    ...                          rule="rescale", name="adaclip")
    >>> state = tx.init({"w": jnp.zeros(3)})
    >>> for g in ([1.0, 0.5, 0.0], [4.0, 2.0, 1.0]):  # thresholds 1, then (0.25 + 2) / 0.75
    ...   updates, state = tx.update({"w": jnp.array(g)}, state)
    >>> updates["w"]  # values above 3 scaled by 3 / 4 (the largest magnitude): only the first
    Array([3., 2., 1.], dtype=float32)

  References:
    Huang et al., `Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam
    <https://arxiv.org/abs/2502.17055>`_, 2025
  """

  theta: float = 0.999

  def __post_init__(self):
    check_number("theta", self.theta, low=0.0, high=1.0, high_open=True)

  def init(self, groups: Groups) -> MaxEMAState:
    if _per_leaf(groups.granularity):
      shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct((), s.dtype), groups.norms)
      groups = groups._replace(norms=shapes)
    return MaxEMAState(zeros_like_norms(groups), zeros_like_norms(groups, jnp.int32))

  def __call__(self, norms, state: MaxEMAState, context: Context):
    per_leaf = _per_leaf(context.granularity)
    theta = jnp.asarray(self.theta, jnp.float32)
    if per_leaf:
      # The largest norm of each whole leaf: across the devices a leaf is split over.
      leaves, treedef = jax.tree.flatten(norms)
      peaks = distributed.max_across(
        [jnp.max(n, initial=0.0) for n in leaves], leaves, context.axis_names
      )
      norms = jax.tree.unflatten(treedef, peaks)

    def step(norm, ema, steps):
      largest = jnp.asarray(norm, jnp.float32)
      new_ema = theta * ema + (1 - theta) * largest
      new_steps = steps + 1
      new_ema, new_steps = where_observed(largest, (new_ema, new_steps), (ema, steps))
      corrected = new_ema / jnp.maximum(1 - theta ** new_steps.astype(jnp.float32), 1e-30)
      # Before any nonzero norm there is nothing to clip against.
      threshold = jnp.where(new_steps > 0, corrected, jnp.inf)
      return threshold.astype(jnp.float32), new_ema, new_steps

    threshold, ema, steps = map_groups(step, 3, norms, state.ema, state.steps)
    return threshold, MaxEMAState(ema, steps)

  def statistics(self, state: MaxEMAState) -> dict[str, Any]:
    return {"max_ema": state.ema}


class NormMomentsState(NamedTuple):
  """State of :class:`NormMoments`.

  Attributes:
    mean: the EMA of each group's norm (``gamma1``), float32, not bias-corrected.
    root_mean_square: the square root of the EMA of each group's squared norm (``gamma2``),
      kept as a root so that it cannot overflow float32 where the norm is above about 1e19.
    steps: how many norms entered the EMAs of each group (int32).
  """

  mean: Any
  root_mean_square: Any
  steps: Any


@dataclasses.dataclass(frozen=True)
class NormMoments(ThresholdPolicy):
  """The threshold ``m̂ / (sqrt(v̂) + eps)`` from the moments of each group's past norms.

  ``m`` and ``v`` are EMAs of the group's norm and squared norm (decays ``gamma1`` and ``gamma2``,
  this step's included, bias-corrected). With the normalize rule at the layer granularity this is
  Stable-SPAM's AdaGN: each tensor is scaled to norm ``m̂ / (sqrt(v̂) + eps)``, which is about 1
  while the norm is steady and below 1 after a spike (the spike inflates ``v`` more than ``m``).
  A group whose norm is zero leaves its moments alone; a non-finite step leaves the state alone.

  Args:
    gamma1: the decay of the EMA of the norm, in ``[0, 1)``.
    gamma2: the decay of the EMA of the squared norm, in ``[0, 1)``.
    eps: added to ``sqrt(v̂)``, a finite number >= 0.

  Examples:
    >>> import jax.numpy as jnp, clipchain
    >>> tx = clipchain.clip_norm(clipchain.thresholds.NormMoments(), granularity="layer",
    ...                          rule="normalize", name="adagn")
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> updates, state = tx.update({"w": jnp.array([3.0, 4.0])}, state)
    >>> updates["w"]  # the first step: m̂ = n, sqrt(v̂) = n, so the norm is set to 1
    Array([0.6, 0.8], dtype=float32)

  References:
    Huang et al., `Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam
    <https://arxiv.org/abs/2502.17055>`_, 2025
  """

  gamma1: float = 0.7
  gamma2: float = 0.9
  eps: float = 1e-8

  def __post_init__(self):
    check_number("gamma1", self.gamma1, low=0.0, high=1.0, high_open=True)
    check_number("gamma2", self.gamma2, low=0.0, high=1.0, high_open=True)
    check_number("eps", self.eps, low=0.0)

  def check_granularity(self, granularity: Granularity) -> None:
    if granularity.one_group_per_value:
      raise ValueError(
        f"NormMoments needs the norm of a group of values; at {granularity!r} each value is a "
        "group, and normalising each value to a common norm is sign descent. Use the 'layer' "
        "granularity (Stable-SPAM's AdaGN), 'global' or 'unit'."
      )

  def init(self, groups: Groups) -> NormMomentsState:
    return NormMomentsState(
      zeros_like_norms(groups), zeros_like_norms(groups), zeros_like_norms(groups, jnp.int32)
    )

  def __call__(self, norms, state: NormMomentsState, context: Context):
    g1 = jnp.asarray(self.gamma1, jnp.float32)
    g2 = jnp.asarray(self.gamma2, jnp.float32)

    def step(norm, mean, root, steps):
      norm = jnp.asarray(norm, jnp.float32)
      # sqrt(g2 r² + (1 - g2) n²), relative to max(r, n): the squares themselves may overflow.
      big = jnp.maximum(root, norm)
      unit = jnp.where(big > 0, big, 1.0)
      new_root = big * safe_sqrt(g2 * jnp.square(root / unit) + (1 - g2) * jnp.square(norm / unit))
      new = (g1 * mean + (1 - g1) * norm, new_root, steps + 1)
      mean, root, steps = where_observed(norm, new, (mean, root, steps))
      t = steps.astype(jnp.float32)
      m_hat = mean / jnp.maximum(1 - g1**t, 1e-30)
      root_v_hat = root / jnp.sqrt(jnp.maximum(1 - g2**t, 1e-30))
      threshold = jnp.where(steps > 0, m_hat / (root_v_hat + self.eps), 0.0)
      return threshold.astype(jnp.float32), mean, root, steps

    threshold, mean, root, steps = map_groups(
      step, 4, norms, state.mean, state.root_mean_square, state.steps
    )
    return threshold, NormMomentsState(mean, root, steps)

  def statistics(self, state: NormMomentsState) -> dict[str, Any]:
    return {"norm_ema": state.mean}

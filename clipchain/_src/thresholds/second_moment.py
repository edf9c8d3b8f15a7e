"""SPAM's spike clipping: a threshold from an EMA of the squared gradient, per value."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from clipchain._src import distributed
from clipchain._src import norms as norms_lib
from clipchain._src.granularity import Groups
from clipchain._src.thresholds.base import Context, ThresholdPolicy
from clipchain._src.validation import check_in_range, check_positive_int


class SecondMomentState(NamedTuple):
  """State of :class:`SecondMoment`.

  Attributes:
    moment: ``v``, the EMA of the squared clipped norm of each group: a float32 scalar (global
      granularity), one per layer (layer granularity), or, with the unit and element
      granularities, a tuple with one array per leaf of the norms tree (per element: shaped like
      the gradient).
    mean_moment: with the unit and element granularities, the mean of ``v`` over every unit or
      value of the tree, across devices where it is split over them (float32); else ``()``.
  """

  moment: Any
  mean_moment: jax.Array | tuple[()] = ()

  def report(self) -> dict[str, jax.Array]:
    """``moment_rms``, ``sqrt(v)``: per layer with the layer granularity; with the unit and
    element granularities the root of the mean ``v`` over units or values."""
    if isinstance(self.moment, tuple):
      return {"moment_rms": norms_lib.safe_sqrt(self.mean_moment)}
    return {"moment_rms": norms_lib.safe_sqrt(self.moment)}


class SecondMoment(ThresholdPolicy):
  """SPAM's spike-aware clipping: clip where ``g² > threshold · v``, with ``v`` an EMA of ``g²``.

  Per value (the element granularity), with ``v`` the EMA of the squared gradient up to the
  previous update, a value whose square exceeds ``threshold · v`` is a spike and is set to
  ``sign(g) · sqrt(threshold · v)``: the policy returns ``c = sqrt(threshold · v)`` and the value
  is clipped to ``[-c, c]``. Then ``v ← beta2 · v + (1 - beta2) · g_clipped²``. This is the
  reference SPAM optimizer, where the spike test uses Adam's second moment and that moment is then
  updated with the clipped gradient: chained before ``optax.adam`` with the same ``b2``, ``v``
  here equals Adam's ``nu`` at every step. ``v`` starts at 0 and is not bias-corrected, so during
  the first ``warmup_steps`` updates the policy only accumulates ``v`` and clips nothing (the
  threshold is ``+inf``). SPAM's momentum reset and its re-warmup belong to the optimizer and
  are not part of this policy.

  A value whose ``v`` is 0 (its gradient was exactly 0 at every step so far) has no limit. In the
  reference it has ``threshold · v = 0``: any nonzero gradient there is a spike clipped to 0, so
  ``v`` stays 0 and the value never trains again (an embedding row whose token was absent during
  the warmup, for instance). While some value has no limit, the mean threshold that
  :func:`clipchain.stats` reports is ``+inf``; ``clipped_fraction`` (the fraction of values
  clipped) is the statistic to watch. A step whose tree norm is not finite leaves ``v`` unchanged
  (:func:`clipchain.clip_norm` keeps the policy state).

  Memory: per element ``v`` is one float32 array shaped like the gradient, 4 bytes per parameter
  (as Adam's ``nu``; twice the parameters' size in bfloat16). At the other granularities the same
  rule compares a norm's square with ``threshold`` times the EMA of the squared clipped norm, one
  number per group: the tree (global), each layer or each output unit.

  Args:
    threshold: ``θ``, how many times its running mean square a squared value may be before it is a
      spike, a finite number >= 1 (below 1 every value is clipped at every step and ``v`` decays
      to 0). SPAM uses 5000, about 70 times the running RMS.
    beta2: the EMA decay of ``v``, in ``[0, 1)``; SPAM uses Adam's ``b2 = 0.999``.
    warmup_steps: the number of updates during which nothing is clipped, >= 0. The default 19 is
      the reference's ``grad_accu_steps=20``, which clips from the 20th update on; with
      ``beta2=0.999``, ``v`` then holds about 1.9 % of the mean square, so the first threshold is
      about ``sqrt(5000 · 0.019) ≈ 10`` times the RMS of the values.

  Examples:
    >>> import jax.numpy as jnp, clipchain
    >>> policy = clipchain.thresholds.SecondMoment(threshold=4.0, beta2=0.5, warmup_steps=1)
    >>> tx = clipchain.clip_norm(policy, granularity="element", name="spam")
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> for g in [[1.0, -1.0], [1.0, -5.0]]:  # v = 0.5 after one step: clip to sqrt(4 * 0.5)
    ...   updates, state = tx.update({"w": jnp.array(g)}, state)
    >>> updates["w"]
    Array([ 1.       , -1.4142135], dtype=float32)
    >>> state.policy_state.moment[0]  # 0.5 * 0.5 + 0.5 * 1 and 0.5 * 0.5 + 0.5 * 2
    Array([0.75, 1.25], dtype=float32)

  References:
    Huang et al., `SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training
    <https://arxiv.org/abs/2501.06842>`_, 2025
  """

  def __init__(self, threshold: float = 5000.0, beta2: float = 0.999, warmup_steps: int = 19):
    check_in_range("threshold", threshold, 1.0, math.inf, high_open=True)
    check_in_range("beta2", beta2, 0.0, 1.0, high_open=True)
    check_positive_int("warmup_steps", warmup_steps, allow_zero=True)
    self.threshold = threshold
    self.beta2 = beta2
    self.warmup_steps = warmup_steps

  def init(self, groups: Groups) -> SecondMomentState:
    moments = tuple(jnp.zeros(s.shape, jnp.float32) for s in jax.tree.leaves(groups.norms))
    if groups.granularity.name in ("unit", "element"):
      return SecondMomentState(moments, jnp.zeros((), jnp.float32))
    return SecondMomentState(moments[0])

  def __call__(self, norms, state: SecondMomentState, context: Context):
    leaves, treedef = jax.tree.flatten(norms)
    moments = state.moment if isinstance(state.moment, tuple) else (state.moment,)
    active = context.count >= self.warmup_steps
    thresholds, new_moments = [], []
    for norm, v in zip(leaves, moments):
      norm = jnp.asarray(norm, jnp.float32)
      limit = jnp.where(active & (v > 0), jnp.sqrt(self.threshold * v), jnp.inf)
      clipped = jnp.minimum(norm, limit)
      new_moments.append(self.beta2 * v + (1 - self.beta2) * clipped * clipped)
      thresholds.append(limit)
    thresholds = jax.tree.unflatten(treedef, thresholds)
    if not isinstance(state.moment, tuple):
      return thresholds, SecondMomentState(new_moments[0])
    # Averaged here, where the mesh axes are known: the values of a leaf split across devices
    # differ between them, so a mean taken when the statistics are read would too.
    axes = context.granularity.axis_names
    count = sum(distributed.global_size(v, axes) for v in new_moments)
    total = distributed.total_across([jnp.sum(v) for v in new_moments], new_moments, axes)
    return thresholds, SecondMomentState(tuple(new_moments), total / max(count, 1))

  def __repr__(self) -> str:
    return (
      f"SecondMoment(threshold={self.threshold!r}, beta2={self.beta2!r}, "
      f"warmup_steps={self.warmup_steps!r})"
    )

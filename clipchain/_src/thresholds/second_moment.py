"""SPAM's spike clipping: a threshold from an EMA of the squared gradient, per value."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax.numpy as jnp

from clipchain._src import norms as norms_lib
from clipchain._src.granularity import Groups
from clipchain._src.thresholds.base import Context, ThresholdPolicy, map_groups, zeros_like_norms
from clipchain._src.validation import check_int, check_number


class SecondMomentState(NamedTuple):
  """State of :class:`SecondMoment`.

  Attributes:
    rms: ``sqrt(v)``, with ``v`` the EMA of the squared clipped norm of each group, a pytree
      shaped like the norms (per value: shaped like the gradient; float32). The root is kept
      rather than ``v`` so that the limit ``sqrt(threshold) · sqrt(v)`` is a multiply, which
      XLA recomputes in every kernel that clips, instead of a per-value ``sqrt`` it computes once
      and writes out as an array the size of the gradient (see ``benchmarks/README.md``).
  """

  rms: Any


@dataclasses.dataclass(frozen=True)
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

  Unlike the other adaptive policies, a zero norm does enter ``v``: ``v`` is Adam's second moment,
  whose definition decays it on a zero gradient, and a decayed ``v`` cannot freeze a group:
  a value clipped to ``sqrt(threshold · v)`` raises ``v`` by a factor
  ``beta2 + (1 - beta2) · threshold`` (6 with the defaults) per update until it is no longer
  clipped.

  Memory: per element ``sqrt(v)`` is one float32 array shaped like the gradient, 4 bytes per
  parameter (as Adam's ``nu``; twice the parameters' size in bfloat16). At the other
  granularities the same rule compares a norm's square with ``threshold`` times the EMA of the
  squared clipped norm, one number per group: the tree (global), each layer or each output unit.

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
    >>> state.policy_state.rms["w"] ** 2  # v: 0.5 * 0.5 + 0.5 * 1 and 0.5 * 0.5 + 0.5 * 2
    Array([0.75     , 1.2499998], dtype=float32)

  References:
    Huang et al., `SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training
    <https://arxiv.org/abs/2501.06842>`_, 2025
  """

  threshold: float = 5000.0
  beta2: float = 0.999
  warmup_steps: int = 19

  def __post_init__(self):
    check_number("threshold", self.threshold, low=1.0)
    check_number("beta2", self.beta2, low=0.0, high=1.0, high_open=True)
    check_int("warmup_steps", self.warmup_steps, minimum=0)

  def init(self, groups: Groups) -> SecondMomentState:
    return SecondMomentState(zeros_like_norms(groups))

  def __call__(self, norms, state: SecondMomentState, context: Context):
    active = context.count >= self.warmup_steps
    # A threshold that is negative at run time (inject_hyperparams) limits every value to 0, as a
    # negative threshold does everywhere; sqrt of it would be NaN.
    root_theta = jnp.sqrt(jnp.maximum(jnp.asarray(self.threshold, jnp.float32), 0.0))

    def step(norm, rms):
      norm = jnp.asarray(norm, jnp.float32)
      limit = jnp.where(active & (rms > 0), root_theta * rms, jnp.inf)
      clipped = jnp.minimum(norm, limit)
      # The one per-value sqrt, in the kernel that writes the state.
      new_rms = norms_lib.safe_sqrt(self.beta2 * rms * rms + (1 - self.beta2) * clipped * clipped)
      return limit, new_rms

    threshold, rms = map_groups(step, 2, norms, state.rms)
    return threshold, SecondMomentState(rms)

  def statistics(self, state: SecondMomentState) -> dict[str, Any]:
    """``moment_rms``, ``sqrt(v)``: per layer, or its mean over units or values."""
    return {"moment_rms": state.rms}

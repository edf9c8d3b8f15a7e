"""AdaGC's threshold: a multiple of an EMA of each group's clipped norm (OLMo's ratio clipping)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from clipchain._src.granularity import Granularity, Groups
from clipchain._src.thresholds.base import Context, ThresholdPolicy, map_groups, zeros_like_norms
from clipchain._src.validation import (
  check_int,
  check_non_negative,
  check_number,
  check_schedule,
)


class EMARatioState(NamedTuple):
  """State of :class:`EMARatio`.

  Attributes:
    gamma: the reference norm ``γ`` of each group, a pytree shaped like the norms (float32);
      ``+inf`` until the group has had a nonzero norm.
  """

  gamma: Any


@dataclasses.dataclass(frozen=True)
class EMARatio(ThresholdPolicy):
  """AdaGC's threshold: ``ratio`` times an EMA of each group's clipped norm.

  Every group (each layer by default) keeps a reference norm ``γ``, from which it may rise by at
  most a factor ``ratio``. With ``n`` the group's norm at an update:

  * **warmup**, the first ``warmup_steps`` updates: the whole tree is clipped to the global norm
    ``warmup_max_norm`` (``G`` is computed from the groups' norms; every group is scaled by
    ``min(1, warmup_max_norm / (G + eps))``, which the policy expresses as one threshold per group,
    with ``G`` the L2 norm of the whole update (``Context.norm``),
    ``n · warmup_max_norm / (G + eps)``), and ``γ ← min(γ, n')`` where ``n'`` is the group's norm
    after that clip (a running minimum). ``warmup_max_norm=None`` leaves the warmup unclipped.
  * **after the warmup**: with ``c = ratio · γ``, a group is scaled by ``min(1, c / (n + eps))``
    (the threshold reported is ``c``, or the norm it was clipped to), then
    ``γ ← beta · γ + (1 - beta) · n'`` with ``n' = min(n, c)`` up to ``eps``, the clipped norm.

  ``eps`` enters the scale as in the reference implementations (Megatron, OLMo,
  ``torch.nn.utils.clip_grad_norm_``); clipped groups come out ``eps / n`` below their threshold.

  Two rules keep a group with a zero gradient (a layer that received none, a zero-initialised
  branch at the first step) from being frozen: ``γ`` starts at ``+inf`` and a zero clipped norm
  never enters it, neither the running minimum nor the EMA. In the reference such a group gets
  ``γ = 0``, so it is clipped to zero, or made NaN by ``0 / 0``, for the rest of training. A group
  whose ``γ`` is still ``+inf`` after the warmup has no limit, and its first nonzero norm starts
  its EMA. A step whose tree norm is not finite leaves ``γ`` unchanged
  (:func:`clipchain.clip_norm` keeps the policy state).

  OLMo's ``max_grad_norm_ratio`` is this policy with ``warmup_steps=1, warmup_max_norm=None``
  per parameter tensor: its EMA of the clipped norm starts at the first norm (that update is not
  clipped), decays at ``beta = max(beta1, beta2)`` of the optimizer and clips to ``ratio`` times
  itself, with the same ``eps=1e-6``. OLMo's clip warmup (``grad_clip_warmup_steps=k``,
  ``grad_clip_warmup_factor=f``) is the schedule
  ``ratio=lambda count: jnp.where(count < k, f * r, r)``. OLMo's code stores the EMA only from
  its second step on, so there it restarts at the second norm; the difference fades after about
  ``1 / (1 - beta)`` steps.

  The ``pytorch_optimizer`` port (``AdaGC``) warms up for ``warmup_steps - 1`` updates (its test is
  ``step < warmup_steps`` with steps counted from 1) and defaults to ``ratio=1.05, beta=0.98``.

  At the layer granularity this is AdaGC (one ``γ`` per tensor); at the global granularity one
  ``γ`` for the whole tree; at the unit granularity one per output unit. The element granularity
  is refused.

  Args:
    ratio: the factor ``λ_rel`` by which a norm may exceed its ``γ``, a finite number >= 1 (below
      1 every group is clipped at every step and ``γ`` decays to 0), or a schedule
      ``count -> ratio`` of the update count (from 0).
    beta: the EMA decay of ``γ``, in ``[0, 1)``.
    warmup_steps: the number of updates of the warmup, >= 0.
    warmup_max_norm: the global-norm clip ``λ_abs`` of the warmup (finite, >= 0), or ``None``.
    eps: added to the norm in the scale of a clipped group, finite, >= 0.

  Examples:
    >>> import jax.numpy as jnp, clipchain
    >>> policy = clipchain.thresholds.EMARatio(
    ...     ratio=2.0, beta=0.5, warmup_steps=1, warmup_max_norm=None)
    >>> tx = clipchain.clip_norm(policy, granularity="layer", name="adagc")
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> for g in [1.0, 3.0, 10.0]:  # clipped to 2 * gamma; gamma <- (gamma + clipped norm) / 2
    ...   updates, state = tx.update({"w": jnp.array([g, 0.0])}, state)
    ...   print(round(float(updates["w"][0]), 4), round(float(state.policy_state.gamma[0]), 4))
    1.0 1.0
    2.0 1.5
    3.0 2.25
    >>> round(float(clipchain.stats(state)["adagc/gamma/w"]), 4)
    2.25

  References:
    Wang et al., `AdaGC: Improving Training Stability for Large Language Model Pretraining
    <https://arxiv.org/abs/2502.11034>`_, 2025
  """

  ratio: float | Callable[[jax.Array], jax.typing.ArrayLike] = 1.04
  beta: float = 0.99
  warmup_steps: int = 100
  warmup_max_norm: float | None = 1.0
  eps: float = 1e-6

  def __post_init__(self):
    if callable(self.ratio):
      check_schedule("ratio", self.ratio)
    else:
      check_number("ratio", self.ratio, low=1.0)
    check_number("beta", self.beta, low=0.0, high=1.0, high_open=True)
    check_int("warmup_steps", self.warmup_steps, minimum=0)
    if self.warmup_max_norm is not None:
      check_non_negative("warmup_max_norm", self.warmup_max_norm)
    check_non_negative("eps", self.eps)

  def check_granularity(self, granularity: Granularity) -> None:
    if granularity.one_group_per_value:
      raise ValueError(
        f"EMARatio (AdaGC) needs the norm of a group of values; at {granularity!r} every value "
        "is its own group, and a magnitude crosses zero whenever its sign changes, so the "
        "warmup's running minimum would be about 0 for nearly every value and the threshold "
        "ratio * gamma would clip them all. Use the 'layer' (AdaGC), 'global' or 'unit' "
        "granularity, or thresholds.SecondMoment (SPAM) to clip per-value spikes."
      )

  def init(self, groups: Groups) -> EMARatioState:
    return EMARatioState(zeros_like_norms(groups, fill=jnp.inf))

  def __call__(self, norms, state: EMARatioState, context: Context):
    warmup = context.count < self.warmup_steps
    ratio = self.ratio(context.count) if callable(self.ratio) else self.ratio
    ratio = jnp.asarray(ratio, jnp.float32)
    if self.warmup_max_norm is None:
      global_scale = None
    else:
      global_scale = self.warmup_max_norm / (jnp.asarray(context.norm, jnp.float32) + self.eps)

    def step(norm, gamma):
      norm = jnp.asarray(norm, jnp.float32)
      seen = jnp.isfinite(gamma)
      # Arithmetic on a finite stand-in for gamma = inf (no limit), so that neither the value nor
      # jax.grad meets inf * 0.
      known = jnp.where(seen, gamma, 0.0)
      limit = ratio * known
      scale = limit / (norm + self.eps)
      clipped_here = seen & (scale < 1.0)
      # A clipped group's threshold is the norm it is clipped to, so that the core's c / n is the
      # reference's c / (n + eps).
      relative_limit = jnp.where(clipped_here, norm * jnp.where(clipped_here, scale, 1.0), limit)
      relative_limit = jnp.where(seen, relative_limit, jnp.inf)
      # Warmup: each group's share of the global clip (>= its norm when the tree is not clipped).
      warmup_limit = jnp.full_like(norm, jnp.inf) if global_scale is None else norm * global_scale
      threshold = jnp.where(warmup, warmup_limit, relative_limit)
      clipped = jnp.minimum(norm, threshold)
      ema = jnp.where(seen, self.beta * known + (1 - self.beta) * clipped, clipped)
      updated = jnp.where(warmup, jnp.minimum(gamma, clipped), ema)
      # A zero norm says nothing about the group's scale: it must not pull gamma to 0.
      new_gamma = jnp.where(clipped > 0, updated, gamma).astype(jnp.float32)
      return threshold.astype(jnp.float32), new_gamma

    threshold, gamma = map_groups(step, 2, norms, state.gamma)
    return threshold, EMARatioState(gamma)

  def statistics(self, state: EMARatioState) -> dict[str, Any]:
    return {"gamma": state.gamma}

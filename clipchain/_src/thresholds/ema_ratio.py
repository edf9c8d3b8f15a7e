"""AdaGC's threshold: a multiple of an EMA of each group's clipped norm (OLMo's ratio clipping)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from clipchain._src import norms as norms_lib
from clipchain._src.granularity import Granularity, Groups
from clipchain._src.thresholds.base import Context, ThresholdPolicy
from clipchain._src.validation import check_in_range, check_non_negative, check_positive_int


class EMARatioState(NamedTuple):
  """State of :class:`EMARatio`.

  Attributes:
    gamma: the reference norm ``γ`` of each group: a float32 scalar (global granularity), one per
      layer (layer granularity), or, with the unit granularity, a tuple with one array per leaf
      of the norms tree. ``+inf`` until the group has had a nonzero norm.
  """

  gamma: Any

  def report(self) -> dict[str, jax.Array]:
    """``gamma``: per layer with the layer granularity, averaged over units with the unit one."""
    if isinstance(self.gamma, tuple):
      count = sum(x.size for x in self.gamma)
      return {"gamma": norms_lib.total([jnp.sum(x) for x in self.gamma]) / max(count, 1)}
    return {"gamma": self.gamma}


class EMARatio(ThresholdPolicy):
  """AdaGC's threshold: ``ratio`` times an EMA of each group's clipped norm.

  Every group (each layer by default) keeps a reference norm ``γ``, from which it may rise by at
  most a factor ``ratio``. With ``n`` the group's norm at an update:

  * **warmup**, the first ``warmup_steps`` updates: the whole tree is clipped to the global norm
    ``warmup_max_norm`` (``G`` is computed from the groups' norms; every group is scaled by
    ``min(1, warmup_max_norm / (G + eps))``, which the policy expresses as one threshold per group,
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

  def __init__(
    self,
    ratio: float | Callable[[jax.Array], jax.typing.ArrayLike] = 1.04,
    beta: float = 0.99,
    warmup_steps: int = 100,
    warmup_max_norm: float | None = 1.0,
    eps: float = 1e-6,
  ):
    if not callable(ratio):
      check_in_range("ratio", ratio, 1.0, math.inf, high_open=True)
    check_in_range("beta", beta, 0.0, 1.0, high_open=True)
    check_positive_int("warmup_steps", warmup_steps, allow_zero=True)
    if warmup_max_norm is not None:
      check_non_negative("warmup_max_norm", warmup_max_norm)
    check_non_negative("eps", eps)
    self.ratio = ratio
    self.beta = beta
    self.warmup_steps = warmup_steps
    self.warmup_max_norm = warmup_max_norm
    self.eps = eps

  def check_granularity(self, granularity: Granularity) -> None:
    if granularity.name == "element":
      raise ValueError(
        "EMARatio (AdaGC) needs the norm of a group of values: per value "
        "(granularity='element') a magnitude crosses zero whenever its sign changes, so the "
        "warmup's running minimum would be about 0 for nearly every value and the threshold "
        "ratio * gamma would clip them all. Use the 'layer' (AdaGC), 'global' or 'unit' "
        "granularity, or thresholds.SecondMoment (SPAM) to clip per-value spikes."
      )

  def init(self, groups: Groups) -> EMARatioState:
    gammas = tuple(jnp.full(s.shape, jnp.inf, jnp.float32) for s in jax.tree.leaves(groups.norms))
    return EMARatioState(gammas if groups.granularity.name == "unit" else gammas[0])

  def __call__(self, norms, state: EMARatioState, context: Context):
    leaves, treedef = jax.tree.flatten(norms)
    leaves = [jnp.asarray(n, jnp.float32) for n in leaves]
    gammas = state.gamma if isinstance(state.gamma, tuple) else (state.gamma,)
    warmup = context.count < self.warmup_steps
    ratio = self.ratio(context.count) if callable(self.ratio) else self.ratio
    ratio = jnp.asarray(ratio, jnp.float32)

    if self.warmup_max_norm is not None:
      global_norm = norms_lib.safe_sqrt(norms_lib.total([jnp.sum(n * n) for n in leaves]))
      global_scale = self.warmup_max_norm / (global_norm + self.eps)

    thresholds, new_gammas = [], []
    for norm, gamma in zip(leaves, gammas):
      # Warmup: each group's share of the global clip (>= its norm when the tree is not clipped).
      if self.warmup_max_norm is None:
        warmup_limit = jnp.full_like(norm, jnp.inf)
      else:
        warmup_limit = norm * global_scale
      limit = ratio * gamma
      scale = limit / (norm + self.eps)
      # A clipped group's threshold is the norm it is clipped to, so that the core's c / n is the
      # reference's c / (n + eps); `limit` is inf (no limit) while gamma has seen no norm.
      relative_limit = jnp.where(scale < 1.0, norm * scale, limit)
      threshold = jnp.where(warmup, warmup_limit, relative_limit)
      clipped = jnp.minimum(norm, threshold)
      ema = jnp.where(jnp.isinf(gamma), clipped, self.beta * gamma + (1 - self.beta) * clipped)
      updated = jnp.where(warmup, jnp.minimum(gamma, clipped), ema)
      # A zero norm says nothing about the group's scale: it must not pull gamma to 0.
      new_gammas.append(jnp.where(clipped > 0, updated, gamma).astype(jnp.float32))
      thresholds.append(threshold.astype(jnp.float32))

    new_gamma = tuple(new_gammas) if isinstance(state.gamma, tuple) else new_gammas[0]
    return jax.tree.unflatten(treedef, thresholds), EMARatioState(new_gamma)

  def __repr__(self) -> str:
    return (
      f"EMARatio(ratio={self.ratio!r}, beta={self.beta!r}, warmup_steps={self.warmup_steps!r}, "
      f"warmup_max_norm={self.warmup_max_norm!r}, eps={self.eps!r})"
    )

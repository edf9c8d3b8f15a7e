"""A threshold relative to the parameters' own norm (AGC, adaptive gradient clipping)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from clipchain._src.thresholds.base import Context, ThresholdPolicy
from clipchain._src.validation import check_non_negative


@dataclasses.dataclass(frozen=True)
class RelativeToParams(ThresholdPolicy):
  """The threshold ``clipping * max(‖W‖, eps)``, ``‖W‖`` the params measured like the updates.

  Each group of the update (the tree, a layer, a unit or a value, by the granularity) is allowed a
  norm of at most ``clipping`` times the norm of the same group of the params: the policy of
  adaptive gradient clipping (AGC) when the granularity is ``Unit``. ``eps`` keeps
  zero-initialised params (biases, gains) from being frozen. Stateless; it needs the params, so
  the transform must be called as ``tx.update(updates, state, params)``.

  Args:
    clipping: the largest allowed ratio of an update's norm to its params' norm (``λ``), a
      finite number >= 0.
    eps: the smallest params norm the ratio is taken against, a finite number >= 0.

  Examples:
    >>> import jax.numpy as jnp, clipchain
    >>> policy = clipchain.thresholds.RelativeToParams(0.1)
    >>> tx = clipchain.clip_norm(policy, granularity="layer")
    >>> params = {"w": jnp.array([3.0, 4.0])}
    >>> u, _ = tx.update({"w": jnp.array([1.0, 0.0])}, tx.init(params), params)
    >>> u["w"]
    Array([0.5, 0. ], dtype=float32)

  References:
    Brock et al., `High-Performance Large-Scale Image Recognition Without Normalization
    <https://arxiv.org/abs/2102.06171>`_, 2021
  """

  needs_params: ClassVar[bool] = True

  clipping: float
  eps: float = 1e-3

  def __post_init__(self):
    check_non_negative("clipping", self.clipping)
    check_non_negative("eps", self.eps)

  def __call__(self, norms, state, context: Context):
    # The core has checked that the params are given and shaped like the updates.
    granularity = context.granularity
    clipping = jnp.asarray(self.clipping, jnp.float32)
    eps = jnp.asarray(self.eps, jnp.float32)
    param_norms = granularity.measure(context.params, context.axis_names).norms
    threshold = jax.tree.map(
      lambda p: clipping * jnp.maximum(p.astype(jnp.float32), eps), param_norms
    )
    return threshold, state

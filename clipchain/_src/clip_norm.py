"""The one core transform: clip at a granularity, to a threshold set by a policy.

Every named transform in clipchain is a preset of :func:`clip_norm`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from clipchain._src import distributed, norms
from clipchain._src import stats as stats_lib
from clipchain._src.granularity import Granularity, as_granularity
from clipchain._src.thresholds.base import Context, ThresholdPolicy
from clipchain._src.thresholds.fixed import Fixed, Scheduled

ThresholdLike = (
  jax.typing.ArrayLike | Mapping[str, float] | Callable[[jax.Array], Any] | ThresholdPolicy
)


def as_policy(threshold: ThresholdLike, argname: str = "threshold") -> ThresholdPolicy:
  """A number or per-layer mapping as :class:`Fixed`, a schedule as :class:`Scheduled`."""
  if isinstance(threshold, ThresholdPolicy):
    return threshold
  if callable(threshold) and not isinstance(threshold, jax.Array):
    return Scheduled(threshold)
  return Fixed(threshold, argname=argname)


@stats_lib.register_state("name", "layer_names")
class ClipNormState(NamedTuple):
  """State of :func:`clip_norm` and every clipping preset.

  All statistics describe the last update and are 0 before the first one.

  Attributes:
    count: number of updates made (int32).
    norm: the L2 norm of the whole update before clipping.
    clipped_norm: the L2 norm of the whole update after clipping.
    threshold: the threshold applied: a scalar; one per layer with the layer granularity; the mean
      over groups for per-unit or per-element thresholds that differ.
    clipped_fraction: the fraction of groups (the tree, layers, units or values) scaled down.
    layer_norms: the norm of each layer before clipping (layer granularity; else ``()``: Orbax
      cannot save a zero-size array).
    policy_state: the threshold policy's own state.
    name: the name under which :func:`clipchain.stats` reports (static, not an array).
    layer_names: the path of each layer (static).
  """

  count: jax.Array
  norm: jax.Array
  clipped_norm: jax.Array
  threshold: jax.Array
  clipped_fraction: jax.Array
  layer_norms: jax.Array | tuple[()]
  policy_state: Any
  name: str = "clip_norm"
  layer_names: tuple[str, ...] = ()

  def report(self) -> dict[str, jax.Array]:
    out = {
      "norm": self.norm,
      "clipped_norm": self.clipped_norm,
      "clipped_fraction": self.clipped_fraction,
    }
    if self.layer_names:
      out.update(self._per_layer("norm", self.layer_norms))
      out.update(self._per_layer("threshold", self.threshold))
    else:
      out["threshold"] = self.threshold
    policy_report = getattr(self.policy_state, "report", None)
    if callable(policy_report):
      for key, value in policy_report().items():
        if self.layer_names and jnp.shape(value)[-1:] == (len(self.layer_names),):
          out.update(self._per_layer(key, value))
        else:
          out[key] = value
    return out

  def _per_layer(self, key: str, values: jax.Array) -> dict[str, jax.Array]:
    return {f"{key}/{layer}": values[..., i] for i, layer in enumerate(self.layer_names)}


def clip_norm(
  threshold: ThresholdLike,
  *,
  granularity: str | Granularity = "global",
  name: str | None = None,
  axis_name: distributed.AxisName = None,
) -> optax.GradientTransformation:
  """Clips updates so that each group's norm is at most a threshold.

  The general constructor behind every clipchain transform: *where* the norm is measured
  (``granularity``) and *how* the threshold is set (``threshold``: a number, a schedule or a
  policy from :mod:`clipchain.thresholds`) are independent choices. Each group ``g`` with norm
  ``‖g‖`` above the threshold ``c`` is scaled by ``c / ‖g‖``; the element granularity clips values
  to ``[-c, c]``. Norms are accumulated in float32 whatever the update's dtype, updates keep their
  dtype, and the scale is applied as one fused multiply (no second gradient-sized buffer).

  Args:
    threshold: a non-negative finite number; with the layer granularity, a mapping from layer
      name to threshold; a schedule ``step -> threshold`` (e.g. an ``optax`` schedule); or a
      :class:`clipchain.thresholds.ThresholdPolicy`.
    granularity: ``"global"``, ``"layer"``, ``"unit"``, ``"element"``, or a configured
      :mod:`clipchain.granularity` object such as ``Layer(layers="module")``.
    name: the name under which :func:`clipchain.stats` reports this transform.
    axis_name: inside ``shard_map`` or ``pmap``, the mesh axis name(s) to sum norms across, so that
      a tree split over devices is clipped by its true norm and every device computes the same
      thresholds and statistics. Each leaf is counted only over the axes along which it varies.
      Not needed under ``jit`` with sharded arrays, nor after a ``pmean`` of the gradients (it
      would then over-count). See ``docs/distributed.md``.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`ClipNormState`.

  Raises:
    ValueError: at construction, for a negative, NaN or infinite threshold, an unknown
      granularity, or a policy that is meaningless at the granularity.

  Examples:
    >>> import jax.numpy as jnp, optax, clipchain
    >>> tx = optax.chain(
    ...     clipchain.clip_norm(1.0, granularity="layer", name="clip"), optax.sgd(1.0))
    >>> params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
    >>> grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.5])}
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> updates["a"], updates["b"]
    (Array([-0.6, -0.8], dtype=float32), Array([-0.5], dtype=float32))
    >>> float(clipchain.stats(state)["clip/norm/a"])
    5.0
  """
  policy = as_policy(threshold)
  where = as_granularity(granularity).across(axis_name)
  policy.check_granularity(where)
  if name is None:
    name = "clip_norm"
  elif not isinstance(name, str) or not name:
    raise ValueError(f"name must be a non-empty str; got {name!r}.")

  def init_fn(params):
    groups = where.groups(params)
    zero = jnp.zeros((), jnp.float32)
    return ClipNormState(
      count=jnp.zeros((), jnp.int32),
      norm=zero,
      clipped_norm=zero,
      threshold=jnp.zeros(groups.norms.shape if groups.names else (), jnp.float32),
      clipped_fraction=zero,
      layer_norms=jnp.zeros((len(groups.names),), jnp.float32) if groups.names else (),
      policy_state=policy.init(groups),
      name=name,
      layer_names=groups.names,
    )

  def update_fn(updates, state, params=None):
    groups = where.groups(updates)
    if groups.names != state.layer_names:
      raise ValueError(
        f"{name}: the updates' layers {list(groups.names)} differ from those the state was "
        f"initialised with {list(state.layer_names)}; call init on a tree shaped like the updates."
      )
    measured = where.measure(updates)
    context = Context(count=state.count, params=params, groups=groups)
    limit, policy_state = policy(measured.norms, state.policy_state, context)
    clipped, summary = where.clip(updates, measured, limit)
    # A non-finite norm must not enter a policy's history, mean or tracker: keep the old state.
    finite = jnp.isfinite(measured.total_squares)
    policy_state = jax.tree.map(
      lambda new, old: jnp.where(finite, new, old), policy_state, state.policy_state
    )
    new_state = state._replace(
      count=optax.safe_increment(state.count),
      norm=norms.safe_sqrt(measured.total_squares),
      clipped_norm=summary.clipped_norm,
      threshold=summary.threshold,
      clipped_fraction=summary.clipped_fraction,
      layer_norms=summary.layer_norms if state.layer_names else (),
      policy_state=policy_state,
    )
    return clipped, new_state

  return optax.GradientTransformation(init_fn, update_fn)

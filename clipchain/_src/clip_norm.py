"""The one core transform: clip at a granularity, to a threshold set by a policy.

Every named transform in clipchain is a preset of :func:`clip_norm`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from clipchain._src import distributed, masking
from clipchain._src import state as state_lib
from clipchain._src.granularity import (
  Granularity,
  GranularityLike,
  Summary,
  as_granularity,
  broadcast_like,
  is_scalar,
  measure_robustly,
)
from clipchain._src.rules import RuleLike, as_rule
from clipchain._src.state import Static, keep_dtypes
from clipchain._src.thresholds.base import Context, ThresholdPolicy
from clipchain._src.thresholds.fixed import Fixed, Scheduled
from clipchain._src.tree import TreeSignature, check_same_tree
from clipchain._src.validation import check_name

ThresholdLike = (
  jax.typing.ArrayLike | Mapping[str, float] | Callable[[jax.Array], Any] | ThresholdPolicy
)


def as_policy(threshold: ThresholdLike, argname: str = "threshold") -> ThresholdPolicy:
  """A number or per-layer mapping as :class:`Fixed`, a schedule as :class:`Scheduled`."""
  if isinstance(threshold, ThresholdPolicy):
    return threshold
  if callable(threshold) and not isinstance(threshold, jax.Array):
    return Scheduled(threshold, argname=argname)
  return Fixed(threshold, argname=argname)


# The statistics ClipNormState reports itself: a policy's may not take their names.
OWN_STATISTICS = ("norm", "total_norm", "clipped_norm", "clipped_fraction", "threshold")


def _broadcasts_to(shape, target) -> bool:
  try:
    return jnp.broadcast_shapes(shape, target) == tuple(target)
  except ValueError:
    return False


def _threshold_is_scalar(policy: ThresholdPolicy, groups, policy_state, params) -> bool:
  """Whether ``policy`` gives one threshold for every group (known from shapes alone)."""

  def threshold_of(norms, state, params):
    context = Context(
      count=jnp.zeros((), jnp.int32), params=params, groups=groups, norm=jnp.zeros((), jnp.float32)
    )
    return policy(norms, state, context)[0]

  threshold = jax.eval_shape(threshold_of, groups.norms, policy_state, params)
  leaves = jax.tree.leaves(threshold)
  return len(leaves) == 1 and leaves[0] is threshold and threshold.shape == ()


def _threshold_like_norms(policy, threshold, norms):
  """The threshold as a float32 scalar, or as a pytree exactly shaped like the norms (a value that
  broadcasts to a group's norms is broadcast, so states and summaries see the norms' shapes)."""
  if is_scalar(threshold):
    return jnp.asarray(threshold, jnp.float32)
  same = jax.tree.structure(threshold) == jax.tree.structure(norms) and all(
    _broadcasts_to(jnp.shape(t), jnp.shape(n))
    for t, n in zip(jax.tree.leaves(threshold), jax.tree.leaves(norms))
  )
  if not same:
    raise ValueError(
      f"{policy!r} returned a threshold shaped {jax.tree.map(jnp.shape, threshold)}; it must be a "
      f"scalar or shaped like the norms, {jax.tree.map(jnp.shape, norms)}."
    )
  return jax.tree.map(distributed.vary_like, broadcast_like(threshold, norms), norms)


@state_lib.state(state_lib.Role.MEASURES_INPUT)
class ClipNormState(NamedTuple):
  """State of :func:`clip_norm` and every clipping preset.

  All statistics describe the last update and are 0 before the first one, except the policy's
  estimates (``policy_stats``), which describe its initial state until then.

  Attributes:
    count: number of updates made (int32).
    norm: the L2 norm of the whole update before clipping.
    clipped_norm: the L2 norm of the whole update after clipping (0, and not reported by
      :func:`clipchain.stats`, where the granularity does not measure it: ``clip`` without
      ``clip_statistics=True``).
    threshold: the threshold applied, summarised by the granularity: a scalar; one per layer with
      the layer granularity; the mean over units or values where they differ (``()``, and not
      reported, where it differs between values and the granularity does not summarise them:
      ``Element(clip_statistics=False)``).
    clipped_fraction: the fraction of groups (the tree, layers, units or values) scaled down
      (as ``clipped_norm``, where measured).
    layer_norms: the norm of each layer before clipping (layer granularity; else ``()``: Orbax
      cannot save a zero-size array).
    policy_state: the threshold policy's own state.
    policy_stats: the policy's estimates (``ThresholdPolicy.statistics``) summarised by the
      granularity, by name (none where it does not summarise per value).
    settings: records the policy and the groups (their names and shapes) as the key of one int8
      leaf, so that a checkpoint restored into a transform whose state means something else (a
      renamed layer mapping, another policy) fails in Orbax, naming both.
    total_norm: with ``mask=``, the L2 norm of the whole update, the leaves it passes through
      included (``norm`` is that of the leaves it clips); else ``()``.
    name: the name under which :func:`clipchain.stats` reports (static, not an array).
    layer_names: the name of each layer (static).
    axis_names: the mesh axes norms are summed across (static).
    signature: the paths and shapes of the tree ``init`` saw (static).
    granularity: the granularity as it applies to the tree ``init`` saw (static; see
      :meth:`clipchain.granularity.Granularity.bind`), or ``None`` when that is the transform's.
    reports_clipping: whether ``clipped_norm``, ``clipped_fraction`` and the summaries of
      per-value thresholds and estimates are measured (static).
  """

  count: jax.Array  # type: ignore[assignment]  # a field, as in optax's states
  norm: jax.Array
  clipped_norm: jax.Array
  threshold: jax.Array
  clipped_fraction: jax.Array
  layer_norms: jax.Array | tuple[()]
  policy_state: Any
  policy_stats: dict[str, jax.Array]
  settings: dict[str, jax.Array]
  total_norm: jax.Array | tuple[()] = ()
  name: Static[str] = "clip_norm"
  layer_names: Static[tuple[str, ...]] = ()
  axis_names: Static[tuple[str, ...]] = ()
  signature: Static[TreeSignature | None] = None
  granularity: Static[Granularity | None] = None
  reports_clipping: Static[bool] = True

  def input_norm(self) -> jax.Array:
    return self.norm if isinstance(self.total_norm, tuple) else self.total_norm

  def report(self) -> dict[str, jax.Array]:
    out = {"norm": self.norm}
    if self.reports_clipping:
      out.update(clipped_norm=self.clipped_norm, clipped_fraction=self.clipped_fraction)
    if not isinstance(self.total_norm, tuple):
      out["total_norm"] = self.total_norm
    per_group = dict(self.policy_stats)
    if not isinstance(self.threshold, tuple):
      per_group = {"threshold": self.threshold, **per_group}
    if self.layer_names:
      # With named groups layer_norms is the per-layer vector (an empty tuple only without them).
      out.update(self._per_layer("norm", self.layer_norms))  # type: ignore[arg-type]
      for key, value in per_group.items():
        out.update(self._per_layer(key, value))
    else:
      out.update(per_group)
    return out

  def _per_layer(self, key: str, values: jax.Array) -> dict[str, jax.Array]:
    return {f"{key}/{layer}": values[..., i] for i, layer in enumerate(self.layer_names)}


def clip_norm(
  threshold: ThresholdLike,
  *,
  granularity: GranularityLike = "global",
  rule: RuleLike = "clip",
  mask: masking.MaskLike = None,
  name: str = "clip_norm",
  axis_name: distributed.AxisName = None,
) -> optax.GradientTransformation:
  """Clips updates so that each group's norm is at most a threshold, or normalises it to it.

  The general constructor behind every clipchain transform: *where* the norm is measured
  (``granularity``), *how* the threshold is set (``threshold``: a number, a schedule or a
  policy from :mod:`clipchain.thresholds`) and *what is done* with it (``rule``) are independent
  choices. With ``rule="clip"`` each group ``g`` with norm ``‖g‖`` above the threshold ``c`` is
  scaled by ``c / ‖g‖``; the element granularity clips values to ``[-c, c]`` (a complex value
  keeps its phase). With ``rule="normalize"`` every group is scaled to norm ``c`` (a zero group
  stays zero). Norms are accumulated in float32 whatever the update's dtype (and measured again,
  scaled, where the float32 sum of squares of finite values overflows or underflows), updates
  keep their dtype, and the scale is applied as one fused multiply (no second gradient-sized
  buffer). A threshold that is negative at run time (a schedule, or
  ``optax.inject_hyperparams`` under ``jit``) is taken as 0: the update is clipped to zero, never
  flipped; a NaN threshold gives NaN updates rather than a silently wrong number.

  Args:
    threshold: a non-negative finite number; with the layer granularity, a mapping from layer
      name to threshold; a schedule ``step -> threshold`` (e.g. an ``optax`` schedule); or a
      :class:`clipchain.thresholds.ThresholdPolicy`.
    granularity: ``"global"``, ``"layer"``, ``"unit"``, ``"element"``, or a
      :mod:`clipchain.granularity` object such as ``Layer(layers="module")`` or
      ``Layer(stacked_axes=1)`` (one group per layer of a scanned stack).
    rule: ``"clip"`` (cap each group's norm at the threshold), ``"rescale"`` (scale the groups
      above it by ``c / the largest norm``, keeping their order), ``"normalize"`` (set every
      group's norm to the threshold: normalised gradient descent at the global granularity, the
      LARS trust ratio at the layer granularity with
      :class:`~clipchain.thresholds.RelativeToParams`; ``clipchain.rules.Normalize(stabilizer)``
      for automatic clipping), or a :class:`clipchain.rules.Rule`. A granularity may refuse a
      rule (:meth:`~clipchain.granularity.Granularity.check_rule`): the element granularity
      refuses normalising, which would replace each value by ``±c``.
    mask: which leaves are measured and clipped, as ``optax.masked`` takes it: a pytree of
      Python booleans shaped like the updates (or a prefix of them), or a callable
      ``updates -> such a pytree`` (given the params at ``init``). The other leaves pass through
      untouched and the statistics describe the selected ones, with ``total_norm`` beside them:
      the norm of the whole update, from the same read of the gradients (a guard around the
      transform decides from it). For a clip beside an optimizer that treats some leaves on its
      own, e.g. every leaf ``optax.contrib.muon`` does not orthogonalise. Every preset takes it too.
    name: the name under which :func:`clipchain.stats` reports this transform. Every preset
      takes it too.
    axis_name: inside ``shard_map`` or ``pmap``, the mesh axis name(s) to sum norms across, so that
      a tree split over devices is clipped by its true norm and every device computes the same
      thresholds and statistics. Each leaf is counted only over the axes along which it varies; a
      name that is not an axis there is an error. Not needed under ``jit`` with sharded arrays,
      nor after a ``pmean`` of the gradients (it would then over-count). See
      ``docs/distributed.md``. Every preset takes it too.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`ClipNormState`.

  Raises:
    TypeError: at construction, for an argument of the wrong type.
    ValueError: at construction, for a negative, NaN, infinite or non-scalar threshold, an
      unknown granularity, a policy that is meaningless at the granularity or a rule the
      granularity refuses; at ``init`` for a tree the granularity cannot group; at ``update`` for
      updates shaped unlike the tree given to ``init``.

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
  where = as_granularity(granularity)
  policy.check_granularity(where)
  rule = as_rule(rule)
  where.check_rule(rule)
  check_name(name)
  mask = masking.validate_mask(mask)
  axis_names = distributed.as_axis_names(axis_name)

  def summaries(at: Granularity, policy_state, axes: tuple[str, ...]) -> dict[str, jax.Array]:
    return {
      key: at.summarize(value, axes) for key, value in policy.statistics(policy_state).items()
    }

  def init_fn(params):
    bound = where.bind(params)
    groups = bound.groups(params)
    policy_state = policy.init(groups)
    clashes = [key for key in policy.statistics(policy_state) if key in OWN_STATISTICS]
    if clashes:
      raise ValueError(
        f"{policy!r} reports statistics named {clashes}, which {name} reports itself; rename "
        "them in the policy's statistics()."
      )
    return ClipNormState(
      count=jnp.zeros((), jnp.int32),
      norm=jnp.zeros((), jnp.float32),
      clipped_norm=jnp.zeros((), jnp.float32),
      threshold=(
        jnp.zeros((len(groups.names),) if groups.names else (), jnp.float32)
        if bound.reports_clipping or _threshold_is_scalar(policy, groups, policy_state, params)
        else ()
      ),
      clipped_fraction=jnp.zeros((), jnp.float32),
      layer_norms=jnp.zeros((len(groups.names),), jnp.float32) if groups.names else (),
      policy_state=policy_state,
      # Copies: a summary may be a policy-state array itself, and no two fields may share a
      # buffer (a donated step would donate it twice).
      policy_stats=(
        jax.tree.map(jnp.copy, summaries(bound, policy_state, ())) if bound.reports_clipping else {}
      ),
      settings=state_lib.settings_record(
        f"{type(policy).__name__}_groups_"
        + state_lib.digest(groups.names, jax.tree.map(lambda s: s.shape, groups.norms))
      ),
      name=name,
      layer_names=groups.names,
      axis_names=axis_names,
      signature=TreeSignature(params),
      granularity=None if bound is where else bound,
      reports_clipping=bound.reports_clipping,
    )

  def update_fn(updates, state, params=None):
    if state.signature is not None:
      check_same_tree(name, state.signature, updates)
      if policy.needs_params:
        if params is None:
          raise ValueError(
            f"{name}: {policy!r} sets the threshold from the params' norm and needs the params: "
            "call tx.update(updates, state, params)."
          )
        check_same_tree(name, state.signature, params, what="params")
    distributed.check_bound(axis_names, name)
    at = where if state.granularity is None else state.granularity
    groups = at.groups(updates)
    if groups.names != state.layer_names:
      raise ValueError(
        f"{name}: the granularity names the groups {list(groups.names)} now and "
        f"{list(state.layer_names)} at init; a granularity must name the groups of a tree the same "
        "way every time."
      )
    measured, total_norm = measure_robustly(at, updates, axis_names)
    context = Context(
      count=state.count, params=params, groups=groups, axis_names=axis_names, norm=total_norm
    )
    limit, policy_state = policy(measured.norms, state.policy_state, context)
    limit = _threshold_like_norms(policy, limit, measured.norms)
    # A negative threshold (a schedule, an injected hyperparameter) clips to 0, never flips signs.
    limit = jax.tree.map(lambda c: jnp.where(c < 0, 0.0, jnp.asarray(c, jnp.float32)), limit)
    clipped, summary = at.clip(updates, measured, limit, rule, axis_names)
    # A non-finite norm must not enter a policy's history, mean or tracker: keep the old state.
    # Nor may a NaN from anywhere else (a NaN hyperparameter injected for one step): an entry that
    # came out NaN keeps its old value, elementwise, in the pass that writes it.
    finite = jnp.isfinite(total_norm)
    policy_state = jax.tree.map(
      lambda new, old: jnp.where(finite & ~jnp.isnan(new), new, old),
      policy_state,
      state.policy_state,
    )
    if summary is None:  # not measured: the zeros init gave
      summary = Summary(state.clipped_norm, state.clipped_fraction)
    new_state = state._replace(
      count=optax.safe_increment(state.count),
      norm=total_norm,
      clipped_norm=summary.clipped_norm,
      threshold=(
        ()
        if isinstance(state.threshold, tuple)  # per value, and not summarised
        else jnp.broadcast_to(limit, state.threshold.shape)
        if is_scalar(limit)
        else at.summarize(limit, axis_names)
      ),
      clipped_fraction=summary.clipped_fraction,
      layer_norms=measured.norms if state.layer_names else (),
      policy_state=policy_state,
      policy_stats=summaries(at, policy_state, axis_names) if state.reports_clipping else {},
    )
    return clipped, keep_dtypes(new_state, state)

  if mask is None:
    return optax.GradientTransformation(init_fn, update_fn)
  return masking.masked_transform(init_fn, update_fn, mask, axis_names)

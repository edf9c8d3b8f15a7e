"""A transform that only measures: the norms of the updates, per group and global, for the logs."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from clipchain._src import distributed, masking, stacking
from clipchain._src import state as state_lib
from clipchain._src.granularity import (
  Granularity,
  GranularityLike,
  as_granularity,
  is_scalar,
  measure_robustly,
)
from clipchain._src.state import Static, keep_dtypes
from clipchain._src.tree import TreeSignature, check_same_tree
from clipchain._src.validation import check_name


@state_lib.state(state_lib.Role.MEASURES_INPUT)
class MonitorState(NamedTuple):
  """State of :func:`monitor`. The norms describe the last update (0 before the first).

  Attributes:
    count: number of updates measured (int32).
    norm: the L2 norm of the whole update.
    layer_norms: the norm of each group with a granularity that names its groups (the layer
      granularity); the mean of the groups' norms with one that does not (units); ``()`` at the
      global granularity (Orbax cannot save a zero-size array).
    name: the name under which :func:`clipchain.stats` reports (static).
    total_norm: with ``mask=``, the L2 norm of the whole update, the leaves not measured
      included (``norm`` is that of the measured ones); else ``()``.
    layer_names: the name of each group (static; ``()`` when the groups have no names).
    axis_names: the mesh axes norms are summed across (static).
    signature: the paths and shapes of the tree ``init`` saw (static).
    granularity: the granularity as it applies to that tree (static).
  """

  count: jax.Array  # type: ignore[assignment]  # a field, as in optax's states
  norm: jax.Array
  layer_norms: jax.Array | tuple[()]
  total_norm: jax.Array | tuple[()] = ()
  name: Static[str] = "monitor"
  layer_names: Static[tuple[str, ...]] = ()
  axis_names: Static[tuple[str, ...]] = ()
  signature: Static[TreeSignature | None] = None
  granularity: Static[Granularity | None] = None

  def input_norm(self) -> jax.Array:
    return self.norm if isinstance(self.total_norm, tuple) else self.total_norm

  def report(self) -> dict[str, jax.Array]:
    out = {"norm": self.norm}
    if not isinstance(self.total_norm, tuple):
      out["total_norm"] = self.total_norm
    norms = self.layer_norms
    if isinstance(norms, tuple):
      return out
    if self.layer_names:
      out.update({f"norm/{layer}": norms[..., i] for i, layer in enumerate(self.layer_names)})
    else:
      out["mean_norm"] = norms
    return out


def monitor(
  granularity: GranularityLike = "layer",
  *,
  stacked_axes: stacking.StackedSpec = 0,
  mask: masking.MaskLike = None,
  name: str = "monitor",
  axis_name: distributed.AxisName = None,
) -> optax.GradientTransformation:
  """Measures the updates and passes them on unchanged: per-group and global norms for the logs.

  The updates come out bit for bit as they came in (the same arrays); the norms before any clip,
  per group and for the whole tree, are kept in the state for :func:`clipchain.stats`, at the cost
  of one read of the updates. Place it before the optimizer for gradient norms (per layer, per
  scanned layer with ``stacked_axes``), after it for update norms, or both with two names. A guard
  around a chain that starts with it decides from its norm instead of measuring again.

  Args:
    granularity: ``"layer"`` (each leaf; ``clipchain.granularity.Layer`` for modules, regex
      groups or stacked layers), ``"global"``, or any granularity (a unit granularity reports the
      mean of its units' norms).
    stacked_axes: with the layer granularity, which leading axes of a leaf index stacked (scanned)
      layers, each then reported on its own: an int (every leaf), a ``{path regex: int}`` mapping
      or a callable ``(path, leaf) -> int`` (see :class:`clipchain.granularity.Layer`).
    mask: which leaves are measured, as for :func:`clipchain.clip_norm` (``total_norm`` is the
      whole update's norm); every leaf is passed on unchanged either way.
    name: as for :func:`clipchain.clip_norm`.
    axis_name: as for :func:`clipchain.clip_norm`.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`MonitorState`;
    :func:`clipchain.stats` reports ``"{name}/norm"`` and, per group, ``"{name}/norm/{group}"``.

  Examples:
    >>> import jax.numpy as jnp, optax, clipchain
    >>> tx = optax.chain(clipchain.monitor(), optax.sgd(1.0))
    >>> params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
    >>> grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([12.0])}
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> s = clipchain.stats(state)
    >>> float(s["monitor/norm"]), float(s["monitor/norm/a"]), float(s["monitor/norm/b"])
    (13.0, 5.0, 12.0)
  """
  where = as_granularity(granularity, stacked_axes)
  check_name(name)
  mask = masking.validate_mask(mask)
  axis_names = distributed.as_axis_names(axis_name)

  def init_fn(params):
    bound = where.bind(params)
    groups = bound.groups(params)
    one_group = is_scalar(groups.norms)
    summary = jax.eval_shape(lambda: bound.summarize(_zeros(groups.norms)))
    return MonitorState(
      count=jnp.zeros((), jnp.int32),
      norm=jnp.zeros((), jnp.float32),
      layer_norms=() if one_group else jnp.zeros(summary.shape, jnp.float32),
      name=name,
      layer_names=groups.names,
      axis_names=axis_names,
      signature=TreeSignature(params),
      granularity=bound,
    )

  def update_fn(updates, state, params=None):
    del params
    if state.signature is not None:
      check_same_tree(name, state.signature, updates)
    distributed.check_bound(axis_names, name)
    at = where if state.granularity is None else state.granularity
    # Measured through a barrier: the squares of the updates are otherwise the same expression as
    # the g² of a following Adam's second moment, and XLA, sharing them, writes them out (measured
    # on CPU: a temporary the size of the gradient).
    measured, total_norm = measure_robustly(at, jax.lax.optimization_barrier(updates), axis_names)
    new_state = state._replace(
      count=optax.safe_increment(state.count),
      norm=total_norm,
      layer_norms=(
        () if isinstance(state.layer_norms, tuple) else at.summarize(measured.norms, axis_names)
      ),
    )
    return updates, keep_dtypes(new_state, state)

  if mask is None:
    return optax.GradientTransformation(init_fn, update_fn)
  return masking.masked_transform(init_fn, update_fn, mask, axis_names)


def _zeros(shapes):
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

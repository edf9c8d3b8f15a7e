"""Granularity: where a norm is measured, and how a threshold is applied there.

Four granularities, each a small class with the same three steps:

``groups(tree)``
  the static structure of the norms (from shapes only), given to a threshold policy at ``init``;
``measure(tree)``
  the norms, summed in float32, plus the tree's total sum of squares for statistics;
``clip(tree, measured, threshold)``
  the clipped tree and a :class:`Summary` of what happened.

=============  ======================================  =====================================
granularity    one norm per                            norms given to the policy
=============  ======================================  =====================================
``global``     the whole tree                          a scalar
``layer``      leaf, or group of leaves (a module...)  a vector, one entry per layer
``unit``       output unit of each leaf (AGC)          per leaf, the leaf's shape with the
                                                       reduced axes kept as size 1
``element``    value                                   per leaf, ``|g|`` elementwise
=============  ======================================  =====================================

Norm-based granularities multiply each group by ``min(1, c / norm)``; the element granularity clips
values to ``[-c, c]``, which is the same thing per value, computed exactly.
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from clipchain._src import distributed, norms
from clipchain._src import layers as layers_lib
from clipchain._src.validation import check_choice


class Groups(NamedTuple):
  """Static description of the norms a granularity produces for a given tree.

  Attributes:
    granularity: the granularity that produced it.
    names: the layer names (``layer`` granularity), else ``()``.
    norms: a ``jax.ShapeDtypeStruct`` tree shaped like the norms the policy receives.
  """

  granularity: Granularity
  names: tuple[str, ...]
  norms: Any


class Measured(NamedTuple):
  """What ``measure`` returns: the policy's input and the squares it came from."""

  norms: Any
  squares: Any
  total_squares: jax.Array


class Summary(NamedTuple):
  """What one clip did, as float32 arrays of fixed shape."""

  clipped_norm: jax.Array
  clipped_fraction: jax.Array
  threshold: jax.Array
  layer_norms: jax.Array


def _struct(x) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(jnp.shape(x), jnp.float32)


def _fraction(over_count: jax.Array, total: int) -> jax.Array:
  return over_count.astype(jnp.float32) / max(total, 1)


class Granularity(abc.ABC):
  """Where a norm is measured. Subclasses: :class:`Global`, :class:`Layer`, :class:`Unit`,
  :class:`Element`."""

  name: ClassVar[str]
  # Mesh axes the norms are summed across (see clipchain/_src/distributed.py); set by ``across``.
  axis_names: tuple[str, ...] = ()

  def across(self, axis_name: distributed.AxisName) -> Granularity:
    """This granularity with norms summed across the devices of ``axis_name`` (a copy)."""
    bound = copy.copy(self)
    bound.axis_names = distributed.as_axis_names(axis_name)
    return bound

  def _sum_each(self, values: list, leaves: list) -> list:
    return distributed.sum_across(values, leaves, self.axis_names)

  def _total(self, values: list, leaves: list) -> jax.Array:
    return distributed.total_across(values, leaves, self.axis_names)

  def _mean_threshold(self, threshold) -> jax.Array:
    """Summarises per-group thresholds (a tree) as their mean over the groups of every device, a
    single threshold as itself."""
    leaves = [jnp.asarray(t, jnp.float32) for t in jax.tree.leaves(threshold)]
    if len(leaves) == 1 and leaves[0].ndim == 0:
      return leaves[0]
    count = sum(distributed.global_size(leaf, self.axis_names) for leaf in leaves)
    return self._total([jnp.sum(leaf) for leaf in leaves], leaves) / max(count, 1)

  @abc.abstractmethod
  def groups(self, tree) -> Groups:
    """The static structure of the norms of ``tree``."""

  @abc.abstractmethod
  def measure(self, tree) -> Measured:
    """The norms of ``tree`` at this granularity, accumulated in float32."""

  @abc.abstractmethod
  def clip(self, tree, measured: Measured, threshold) -> tuple[Any, Summary]:
    """Clips ``tree`` to ``threshold`` (broadcastable to the norms) and summarises."""

  def __repr__(self) -> str:
    return f"{type(self).__name__}()"


class Global(Granularity):
  """One L2 norm over every leaf of the tree (``optax.clip_by_global_norm``)."""

  name = "global"

  def groups(self, tree) -> Groups:
    return Groups(self, (), jax.ShapeDtypeStruct((), jnp.float32))

  def measure(self, tree) -> Measured:
    leaves = jax.tree.leaves(tree)
    total = self._total([norms.sum_of_squares(x) for x in leaves], leaves)
    return Measured(norms.safe_sqrt(total), total, total)

  def clip(self, tree, measured, threshold):
    threshold = jnp.asarray(threshold, jnp.float32)
    factor = norms.clip_scale(measured.norms, threshold)
    clipped = jax.tree.map(lambda x: norms.scale(x, factor), tree)
    over = norms.exceeds(measured.norms, threshold)
    summary = Summary(
      clipped_norm=factor * measured.norms,
      clipped_fraction=over.astype(jnp.float32),
      threshold=threshold,
      layer_norms=jnp.zeros((0,), jnp.float32),
    )
    return clipped, summary


class Layer(Granularity):
  """One norm per layer: per leaf by default, or per group of leaves.

  Args:
    layers: how leaves form layers: ``None`` or ``"leaf"`` (each leaf), ``"module"`` (the leaves
      under one parent node, e.g. a Flax module's kernel and bias), a mapping ``{name: regex}``
      (leaves whose path matches the regex, first match wins), or a callable
      ``(path: str, leaf) -> name``.
    measure: ``"l2"`` (the L2 norm) or ``"rms"`` (the root mean square, as Adafactor's and
      ``optax.clip_by_block_rms``'s update clipping).
  """

  name = "layer"

  def __init__(self, layers: layers_lib.LayersSpec = None, *, measure: str = "l2"):
    self.layers = layers_lib.validate_layers(layers)
    check_choice("measure", measure, ("l2", "rms"))
    self.measure_kind = measure

  def __repr__(self) -> str:
    return f"Layer(layers={self.layers!r}, measure={self.measure_kind!r})"

  def _grouping(self, tree) -> layers_lib.Grouping:
    return layers_lib.resolve(self.layers, tree)

  def groups(self, tree) -> Groups:
    names = self._grouping(tree).names
    return Groups(self, names, jax.ShapeDtypeStruct((len(names),), jnp.float32))

  def measure(self, tree) -> Measured:
    grouping = self._grouping(tree)
    leaves = jax.tree.leaves(tree)
    leaf_squares = self._sum_each([norms.sum_of_squares(x) for x in leaves], leaves)
    members: list[list[int]] = [[] for _ in grouping.names]
    for i, layer in enumerate(grouping.leaf_layer):
      members[layer].append(i)
    layer_squares = jnp.stack([norms.total([leaf_squares[i] for i in m]) for m in members])
    if self.measure_kind == "rms":
      sizes = jnp.array(
        [
          max(sum(distributed.global_size(leaves[i], self.axis_names) for i in m), 1)
          for m in members
        ],
        jnp.float32,
      )
      layer_norms = norms.safe_sqrt(layer_squares / sizes)
    else:
      layer_norms = norms.safe_sqrt(layer_squares)
    return Measured(layer_norms, layer_squares, jnp.sum(layer_squares))

  def clip(self, tree, measured, threshold):
    grouping = self._grouping(tree)
    threshold = jnp.broadcast_to(jnp.asarray(threshold, jnp.float32), measured.norms.shape)
    factors = norms.clip_scale(measured.norms, threshold)
    leaves, treedef = jax.tree.flatten(tree)
    clipped = [norms.scale(x, factors[layer]) for x, layer in zip(leaves, grouping.leaf_layer)]
    over = norms.exceeds(measured.norms, threshold)
    summary = Summary(
      clipped_norm=norms.safe_sqrt(jnp.sum(factors * factors * measured.squares)),
      clipped_fraction=_fraction(jnp.sum(over), len(grouping.names)),
      threshold=threshold,
      layer_norms=measured.norms,
    )
    return jax.tree.unflatten(treedef, clipped), summary


_FLAX_UNIT_AXES = {2: (0,), 3: (0,), 4: (0, 1, 2), 5: (0, 1, 2, 3)}


class Unit(Granularity):
  """One norm per output unit of each leaf (the granularity of AGC).

  A unit is the slice of a weight that feeds one output: all axes but the output axis are reduced.

  Args:
    axis: the axes to reduce, for every leaf; overrides ``layout``.
    layout: ``"flax"`` for ``(..., in, out)`` kernels (Flax, Haiku): scalars and vectors are one
      unit, rank 2 and 3 reduce axis 0, rank 4 (HWIO) axes 0-2, rank 5 axes 0-3, as
      ``optax.adaptive_grad_clip``; ``"torch"`` for ``(out, in, ...)`` weights (PyTorch ports,
      Equinox): every axis but the first is reduced.
    stacked_axes: the number of leading axes that index stacked (scanned) layers; they are kept,
      so each layer of a stack is clipped on its own, and the layout applies to the rest.
  """

  name = "unit"

  def __init__(
    self, axis: int | Sequence[int] | None = None, *, layout: str = "flax", stacked_axes: int = 0
  ):
    check_choice("layout", layout, ("flax", "torch"))
    if isinstance(stacked_axes, bool) or not isinstance(stacked_axes, int) or stacked_axes < 0:
      raise ValueError(f"stacked_axes must be an integer >= 0; got {stacked_axes!r}.")
    if axis is not None:
      axes = (axis,) if isinstance(axis, int) else tuple(axis)
      if not all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
        raise ValueError(f"axis must be an int, a sequence of ints or None; got {axis!r}.")
      axis = axes
    self.axis = axis
    self.layout = layout
    self.stacked_axes = stacked_axes

  def __repr__(self) -> str:
    return f"Unit(axis={self.axis!r}, layout={self.layout!r}, stacked_axes={self.stacked_axes})"

  def reduce_axes(
    self, shape: tuple[int, ...], path: str = "", *, split: bool = False
  ) -> tuple[int, ...]:
    """The axes of a leaf of ``shape`` that one unit spans; ``split``: ``shape`` is a shard of a
    leaf split across devices."""
    if self.axis is not None:
      return tuple(a % len(shape) for a in self.axis) if shape else ()
    k = self.stacked_axes
    if len(shape) < k:
      raise ValueError(f"leaf {path!r} of shape {shape} has fewer axes than stacked_axes={k}.")
    inner = shape[k:]
    squeezed_rank = sum(d != 1 for d in inner)
    if self.layout == "torch":
      axes = tuple(range(len(inner))) if len(inner) <= 1 else tuple(range(1, len(inner)))
    elif squeezed_rank <= 1:
      axes = tuple(range(len(inner)))
      # A shard of shape (1, m) is a vector-like (1, k*m) leaf (one unit) or a (k, m) kernel split
      # along its input axis (m units): only the global shape tells, and it is not known here.
      by_rank = _FLAX_UNIT_AXES.get(len(inner), axes)
      if split and any(d > 1 for i, d in enumerate(inner) if i not in by_rank):
        raise ValueError(
          f"leaf {path!r} is split across devices and its shard has shape {shape}: the flax "
          "layout cannot tell whether the axes of size 1 are split axes of a kernel or axes of "
          "size 1 of a vector-like leaf; pass axis= to say which axes to reduce."
        )
    elif len(inner) in _FLAX_UNIT_AXES:
      axes = _FLAX_UNIT_AXES[len(inner)]
    else:
      raise ValueError(
        f"leaf {path!r} has shape {shape}: the flax layout defines units for ranks up to 5 "
        "(after stacked_axes); pass axis= to say which axes to reduce."
      )
    return tuple(a + k for a in axes)

  def _axes(self, tree) -> list[tuple[int, ...]]:
    return [
      self.reduce_axes(
        jnp.shape(x),
        layers_lib.path_str(p),
        split=bool(distributed.varying_axes(x, self.axis_names)),
      )
      for p, x in layers_lib.flatten_with_path(tree)
    ]

  def groups(self, tree) -> Groups:
    shapes = [
      jax.ShapeDtypeStruct(
        tuple(1 if i in axes else d for i, d in enumerate(jnp.shape(x))), jnp.float32
      )
      for x, axes in zip(jax.tree.leaves(tree), self._axes(tree))
    ]
    return Groups(self, (), jax.tree.unflatten(jax.tree.structure(tree), shapes))

  def measure(self, tree) -> Measured:
    leaves, treedef = jax.tree.flatten(tree)
    squares = [
      norms.sum_of_squares(x, axis=axes, keepdims=True) for x, axes in zip(leaves, self._axes(tree))
    ]
    # Summed across devices where a leaf is split along the axes a unit spans (FSDP over the input
    # dimension); a leaf split along its output axis holds whole units and must not be sharded
    # along a named axis here.
    squares = self._sum_each(squares, leaves)
    total = norms.total([jnp.sum(s) for s in squares])
    unit_norms = [norms.safe_sqrt(s) for s in squares]
    return Measured(
      jax.tree.unflatten(treedef, unit_norms), jax.tree.unflatten(treedef, squares), total
    )

  def clip(self, tree, measured, threshold):
    mean_threshold = self._mean_threshold(threshold)
    threshold = _broadcast_like(threshold, measured.norms)
    factors = jax.tree.map(norms.clip_scale, measured.norms, threshold)
    clipped = jax.tree.map(norms.scale, tree, factors)
    over = jax.tree.map(norms.exceeds, measured.norms, threshold)
    unit_count = sum(f.size for f in jax.tree.leaves(factors))
    summary = Summary(
      clipped_norm=norms.safe_sqrt(
        norms.total(
          [
            jnp.sum(f * f * s)
            for f, s in zip(jax.tree.leaves(factors), jax.tree.leaves(measured.squares))
          ]
        )
      ),
      clipped_fraction=_fraction(
        norms.total([jnp.sum(o) for o in jax.tree.leaves(over)]), unit_count
      ),
      threshold=mean_threshold,
      layer_norms=jnp.zeros((0,), jnp.float32),
    )
    return clipped, summary


class Element(Granularity):
  """Every value on its own: ``g`` is clipped to ``[-c, c]`` (``optax.clip``)."""

  name = "element"

  def groups(self, tree) -> Groups:
    return Groups(self, (), jax.tree.map(_struct, tree))

  def measure(self, tree) -> Measured:
    magnitudes = jax.tree.map(lambda x: jnp.abs(x).astype(norms.accumulation_dtype(x.dtype)), tree)
    leaves = jax.tree.leaves(tree)
    total = self._total([norms.sum_of_squares(x) for x in leaves], leaves)
    return Measured(magnitudes, None, total)

  def clip(self, tree, measured, threshold):
    # Per-value thresholds of a leaf split over devices differ between them: averaged across.
    mean_threshold = self._mean_threshold(threshold)
    threshold = _broadcast_like(threshold, tree)

    def clip_leaf(x, c):
      acc = norms.accumulation_dtype(x.dtype)
      c = c.astype(acc)
      return jnp.clip(x.astype(acc), -c, c).astype(norms.output_dtype(x.dtype))

    clipped = jax.tree.map(clip_leaf, tree, threshold)
    leaves = jax.tree.leaves(tree)
    size = sum(distributed.global_size(x, self.axis_names) for x in leaves)
    over = self._total(
      [
        jnp.sum(norms.exceeds(m, c), dtype=jnp.float32)
        for m, c in zip(jax.tree.leaves(measured.norms), jax.tree.leaves(threshold))
      ],
      leaves,
    )
    clipped_squares = self._total(
      [norms.sum_of_squares(x) for x in jax.tree.leaves(clipped)], leaves
    )
    summary = Summary(
      clipped_norm=norms.safe_sqrt(clipped_squares),
      clipped_fraction=_fraction(over, size),
      threshold=mean_threshold,
      layer_norms=jnp.zeros((0,), jnp.float32),
    )
    return clipped, summary


def _broadcast_like(threshold, tree):
  """A single threshold as a tree of it shaped like ``tree``; a tree of thresholds as is."""
  if jax.tree_util.treedef_is_leaf(jax.tree.structure(threshold)):
    value = jnp.asarray(threshold, jnp.float32)
    return jax.tree.map(lambda _: value, tree)
  return jax.tree.map(lambda t: jnp.asarray(t, jnp.float32), threshold)


GRANULARITIES = {cls.name: cls for cls in (Global, Layer, Unit, Element)}


def as_granularity(granularity: str | Granularity) -> Granularity:
  """``"global"``, ``"layer"``, ``"unit"`` or ``"element"`` (with defaults), or a granularity."""
  if isinstance(granularity, Granularity):
    return granularity
  if isinstance(granularity, str) and granularity in GRANULARITIES:
    return GRANULARITIES[granularity]()
  raise ValueError(
    f"granularity must be one of {sorted(GRANULARITIES)} or a clipchain.granularity object; "
    f"got {granularity!r}."
  )

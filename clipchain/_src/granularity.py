"""Granularity: where a norm is measured, how a threshold is applied there, and how statistics of
many groups are summarised.

A granularity owns the shape of everything that is per group. It turns a tree into *norms*, a pytree
with one entry per group, and every threshold policy works elementwise over that pytree
(``jax.tree.map``) without knowing which granularity produced it:

=============  ======================================  =====================================
granularity    one norm per                            the norms pytree
=============  ======================================  =====================================
``Global``     the whole tree                          a scalar
``Layer``      leaf, or group of leaves (a module...)  a vector, one entry per layer (named)
``Unit``       output unit of each leaf (AGC)          per leaf, the leaf's shape with the
                                                       reduced axes kept as size 1
``Element``    value                                   per leaf, ``|g|`` elementwise
=============  ======================================  =====================================

A granularity implements four steps (all static in the tree's structure except ``measure`` and
``clip``, which see values); the mesh axes to sum across are passed in, never stored:

``groups(tree) -> Groups``
  the layer names and the shapes of the norms, given to a policy's ``init``;
``measure(tree, axis_names) -> Measured``
  the norms, summed in float32, and the squares they came from;
``clip(tree, measured, threshold, axis_names) -> (clipped tree, Summary)``
  each group scaled by ``min(1, c / norm)``, and what that did;
``summarize(values, axis_names) -> jax.Array``
  a per-group pytree (a threshold, a policy's estimate) as one statistic: itself for a scalar,
  one entry per layer for named groups, else the mean over groups and devices.

:class:`Slices` does all four for granularities with one norm per slice of each leaf; a subclass
says only which axes a slice spans (``reduce_axes``), as :class:`Unit` does.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp

from clipchain._src import distributed, norms
from clipchain._src import layers as layers_lib
from clipchain._src.rules import CLIP, Rule
from clipchain._src.validation import check_choice, check_int


class Groups(NamedTuple):
  """The static structure of the norms a granularity produces for one tree.

  Attributes:
    granularity: the granularity that produced it.
    names: the group names when the granularity names its groups (``Layer``), else ``()``.
    norms: a pytree of ``jax.ShapeDtypeStruct`` (float32) shaped like the norms a policy receives.
  """

  granularity: Granularity
  names: tuple[str, ...]
  norms: Any


class Measured(NamedTuple):
  """What ``measure`` returns.

  Attributes:
    norms: the norm of each group, a pytree shaped as ``Groups.norms`` (float32, float64 for
      float64 input).
    squares: each group's sum of squares, shaped like ``norms``; ``None`` where it would be as large
      as the tree (``Element``).
    total_squares: the whole tree's sum of squares (a scalar), across devices.
  """

  norms: Any
  squares: Any
  total_squares: jax.Array


class Summary(NamedTuple):
  """What ``clip`` did, as float32 scalars the same on every device.

  Attributes:
    clipped_norm: the L2 norm of the whole tree after clipping.
    clipped_fraction: the fraction of groups that were scaled down.
  """

  clipped_norm: jax.Array
  clipped_fraction: jax.Array


def is_scalar(values) -> bool:
  """Whether ``values`` is one scalar (a threshold shared by every group) rather than a pytree."""
  leaves = jax.tree.leaves(values)
  return len(leaves) == 1 and leaves[0] is values and jnp.ndim(values) == 0


def broadcast_like(values, like):
  """``values`` as float32 arrays shaped like the pytree ``like``: a scalar is repeated, a pytree
  (or array) shaped like ``like`` is kept."""
  if is_scalar(values):
    value = jnp.asarray(values, jnp.float32)
    return jax.tree.map(lambda n: jnp.broadcast_to(value, jnp.shape(n)), like)
  return jax.tree.map(
    lambda v, n: jnp.broadcast_to(jnp.asarray(v, jnp.float32), n.shape), values, like
  )


def _fraction(over_count: jax.Array, total) -> jax.Array:
  return over_count.astype(jnp.float32) / jnp.maximum(jnp.asarray(total, jnp.float32), 1.0)


@dataclasses.dataclass(frozen=True)
class Granularity(abc.ABC):
  """Where a norm is measured. Subclass it (or :class:`Slices`) to write a new granularity.

  The class attributes say what a policy may rely on:

  Attributes:
    one_group_per_value: each group is a single value, whose norm is ``|g|`` (``Element``).
    groups_grow_with_size: the number of groups grows with the size of the leaves (``Unit``,
      ``Element``), so a policy that keeps a long history per group would cost that many times the
      parameters.
    named_groups: the groups have names (``Layer``): ``Groups.names`` lists them, per-group
      statistics are reported per name and thresholds may be given per name.
  """

  one_group_per_value: ClassVar[bool] = False
  groups_grow_with_size: ClassVar[bool] = False
  named_groups: ClassVar[bool] = False

  @abc.abstractmethod
  def groups(self, tree) -> Groups:
    """The static structure of the norms of ``tree`` (from shapes only)."""

  @abc.abstractmethod
  def measure(self, tree, axis_names: tuple[str, ...] = ()) -> Measured:
    """The norms of ``tree``, accumulated in float32, summed across ``axis_names``."""

  @abc.abstractmethod
  def clip(
    self, tree, measured: Measured, threshold, axis_names: tuple[str, ...] = (), rule: Rule = CLIP
  ):
    """``(clipped tree, Summary)``: each group scaled by ``rule.factor(norm, c)`` (by default
    ``min(1, c / norm)``); ``threshold`` is a scalar or a pytree shaped like ``measured.norms``,
    all values >= 0. A granularity whose ``clip`` has no ``rule`` parameter supports the default
    rule only."""

  @abc.abstractmethod
  def summarize(self, values, axis_names: tuple[str, ...] = ()) -> jax.Array:
    """A scalar, or a pytree shaped like the norms, as one float32 statistic (the same on every
    device)."""


@dataclasses.dataclass(frozen=True)
class Global(Granularity):
  """One L2 norm over every leaf of the tree (``optax.clip_by_global_norm``)."""

  def groups(self, tree) -> Groups:
    return Groups(self, (), jax.ShapeDtypeStruct((), jnp.float32))

  def measure(self, tree, axis_names=()) -> Measured:
    leaves = jax.tree.leaves(tree)
    total = distributed.total_across([norms.sum_of_squares(x) for x in leaves], leaves, axis_names)
    return Measured(norms.safe_sqrt(total), total, total)

  def clip(self, tree, measured, threshold, axis_names=(), rule=CLIP):
    threshold = jnp.asarray(threshold, jnp.float32)
    factor = rule.factor(measured.norms, threshold)
    clipped = jax.tree.map(lambda x: norms.scale(x, factor), tree)
    changed = rule.changes(measured.norms, threshold)
    return clipped, Summary(factor * measured.norms, changed.astype(jnp.float32))

  def summarize(self, values, axis_names=()) -> jax.Array:
    return jnp.asarray(values, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Layer(Granularity):
  """One norm per layer: per leaf by default, or per group of leaves.

  Args:
    layers: how leaves form layers: ``None`` or ``"leaf"`` (each leaf), ``"module"`` (the leaves
      under one parent node, e.g. a Flax module's kernel and bias), a mapping ``{name: regex}``
      (leaves whose path matches the regex, first match wins), or a callable
      ``(path: str, leaf) -> name``.
    norm: ``"l2"`` (the L2 norm) or ``"rms"`` (the root mean square, as Adafactor's and
      ``optax.clip_by_block_rms``'s update clipping).
  """

  named_groups: ClassVar[bool] = True

  layers: layers_lib.LayersSpec = None
  norm: Literal["l2", "rms"] = "l2"

  def __post_init__(self):
    object.__setattr__(self, "layers", layers_lib.validate_layers(self.layers))
    check_choice("norm", self.norm, ("l2", "rms"))

  def _grouping(self, tree) -> layers_lib.Grouping:
    return layers_lib.resolve(self.layers, tree)

  def groups(self, tree) -> Groups:
    names = self._grouping(tree).names
    return Groups(self, names, jax.ShapeDtypeStruct((len(names),), jnp.float32))

  def measure(self, tree, axis_names=()) -> Measured:
    grouping = self._grouping(tree)
    leaves = jax.tree.leaves(tree)
    leaf_squares = distributed.sum_across(
      [norms.sum_of_squares(x) for x in leaves], leaves, axis_names
    )
    members = grouping.members()
    if not members:
      empty = jnp.zeros((0,), jnp.float32)
      return Measured(empty, empty, jnp.zeros((), jnp.float32))
    layer_squares = jnp.stack([norms.total([leaf_squares[i] for i in m]) for m in members])
    if self.norm == "rms":
      sizes = [sum(distributed.global_size(leaves[i], axis_names) for i in m) for m in members]
      layer_norms = norms.safe_sqrt(layer_squares / jnp.array([max(s, 1) for s in sizes]))
    else:
      layer_norms = norms.safe_sqrt(layer_squares)
    return Measured(layer_norms, layer_squares, jnp.sum(layer_squares))

  def clip(self, tree, measured, threshold, axis_names=(), rule=CLIP):
    grouping = self._grouping(tree)
    threshold = jnp.broadcast_to(jnp.asarray(threshold, jnp.float32), jnp.shape(measured.norms))
    factors = rule.factor(measured.norms, threshold)
    leaves, treedef = jax.tree.flatten(tree)
    clipped = [norms.scale(x, factors[layer]) for x, layer in zip(leaves, grouping.leaf_layer)]
    over = rule.changes(measured.norms, threshold)
    summary = Summary(
      clipped_norm=norms.safe_sqrt(jnp.sum(factors * factors * measured.squares)),
      clipped_fraction=_fraction(jnp.sum(over), len(grouping.names)),
    )
    return jax.tree.unflatten(treedef, clipped), summary

  def summarize(self, values, axis_names=()) -> jax.Array:
    # One entry per layer; the layers' norms are already summed across devices.
    leaves = jax.tree.leaves(values)
    return jnp.asarray(leaves[0], jnp.float32) if leaves else jnp.zeros((0,), jnp.float32)


@dataclasses.dataclass(frozen=True)
class Slices(Granularity):
  """One norm per slice of each leaf: the base of :class:`Unit` and :class:`Element`.

  A subclass says which axes of a leaf one slice spans (:meth:`reduce_axes`); measuring, clipping
  and summarising are then done here: each leaf's norms have the leaf's shape with those axes kept
  as size 1, and a summary is the mean over every slice of every leaf, across devices.
  """

  groups_grow_with_size: ClassVar[bool] = True
  # Whether per-slice arrays stay split over devices like their leaves (one value per slice), or
  # are whole on every device because each slice's squares were summed across them (a unit).
  slices_split_like_leaves: ClassVar[bool] = False

  @abc.abstractmethod
  def reduce_axes(self, shape: tuple[int, ...], path: str, *, split: bool = False):
    """The axes of a leaf of ``shape`` (at ``path``) that one slice spans, as non-negative ints.

    ``split``: the leaf is a shard of a leaf split across devices (inside ``shard_map``).
    """

  def _axes(self, tree, axis_names=()) -> list[tuple[int, ...]]:
    return [
      self.reduce_axes(
        jnp.shape(x),
        layers_lib.path_str(p),
        split=bool(axis_names and distributed.varying_axes(x, axis_names)),
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

  def measure(self, tree, axis_names=()) -> Measured:
    leaves, treedef = jax.tree.flatten(tree)
    squares = [
      norms.sum_of_squares(x, axis=axes, keepdims=True)
      for x, axes in zip(leaves, self._axes(tree, axis_names))
    ]
    # Summed across the devices a leaf is split over: a slice split over devices (FSDP over the
    # input dimension of a unit) is measured whole.
    squares = distributed.sum_across(squares, leaves, axis_names)
    # The barrier keeps XLA from rewriting sum(per-slice sums) as a second full reduction of the
    # leaf, which would make it materialise the squares as a gradient-sized temporary (measured
    # on CPU: 64 MiB and 4x the step time for 8 leaves of 2048x1024).
    total = norms.total([jnp.sum(s) for s in jax.lax.optimization_barrier(squares)])
    unit_norms = [norms.safe_sqrt(s) for s in squares]
    return Measured(
      jax.tree.unflatten(treedef, unit_norms), jax.tree.unflatten(treedef, squares), total
    )

  def clip(self, tree, measured, threshold, axis_names=(), rule=CLIP):
    threshold = broadcast_like(threshold, measured.norms)
    factors = jax.tree.map(rule.factor, measured.norms, threshold)
    clipped = jax.tree.map(norms.scale, tree, factors)
    over = jax.tree.map(rule.changes, measured.norms, threshold)
    clipped_squares = jax.tree.map(lambda f, s: f * f * s, factors, measured.squares)
    summary = Summary(
      clipped_norm=norms.safe_sqrt(self._sum(clipped_squares, axis_names)),
      clipped_fraction=_fraction(self._sum(over, axis_names), self._count(over, axis_names)),
    )
    return clipped, summary

  def summarize(self, values, axis_names=()) -> jax.Array:
    if is_scalar(values):
      return jnp.asarray(values, jnp.float32)
    return self._sum(values, axis_names) / jnp.maximum(self._count(values, axis_names), 1.0)

  def _sum(self, tree, axis_names) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    sums = [jnp.sum(x, dtype=jnp.float32) for x in leaves]
    if self.slices_split_like_leaves:
      return distributed.total_across(sums, leaves, axis_names)
    return norms.total(sums)

  def _count(self, tree, axis_names) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    if self.slices_split_like_leaves:
      return jnp.asarray(sum(distributed.global_size(x, axis_names) for x in leaves), jnp.float32)
    return jnp.asarray(sum(x.size for x in leaves), jnp.float32)


_FLAX_UNIT_AXES = {2: (0,), 3: (0,), 4: (0, 1, 2), 5: (0, 1, 2, 3)}


@dataclasses.dataclass(frozen=True)
class Unit(Slices):
  """One norm per output unit of each leaf (the granularity of AGC).

  A unit is the slice of a weight that feeds one output: all axes but the output axis are reduced.

  Args:
    axis: the axes to reduce, for every leaf; overrides ``layout``. Negative axes count from the
      end; an axis out of range for a leaf is an error.
    layout: ``"flax"`` for ``(..., in, out)`` kernels (Flax, Haiku): scalars and vectors are one
      unit, rank 2 and 3 reduce axis 0, rank 4 (HWIO) axes 0-2, rank 5 axes 0-3, as
      ``optax.adaptive_grad_clip``; ``"torch"`` for ``(out, in, ...)`` weights (PyTorch ports,
      Equinox): every axis but the first is reduced.
    stacked_axes: the number of leading axes that index stacked (scanned) layers; they are kept,
      so each layer of a stack is clipped on its own, and the layout applies to the rest.
  """

  axis: int | Sequence[int] | None = None
  layout: Literal["flax", "torch"] = "flax"
  stacked_axes: int | None = 0

  def __post_init__(self):
    check_choice("layout", self.layout, ("flax", "torch"))
    stacked = 0 if self.stacked_axes is None else self.stacked_axes
    check_int("stacked_axes", stacked, minimum=0, static=True)
    object.__setattr__(self, "stacked_axes", int(stacked))
    if self.axis is not None:
      axes = (self.axis,) if not isinstance(self.axis, Sequence) else tuple(self.axis)
      for a in axes:
        check_int("axis", a, static=True)
      object.__setattr__(self, "axis", tuple(int(a) for a in axes))

  def reduce_axes(self, shape, path="", *, split=False):
    if self.axis is not None:
      for a in self.axis:
        if not -len(shape) <= a < len(shape):
          raise ValueError(
            f"axis={self.axis} is out of range for leaf {path!r} of shape {shape} (rank "
            f"{len(shape)}); pass axes that every leaf has, or mask the leaves that differ."
          )
      return tuple(sorted({a % len(shape) for a in self.axis}))
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


@dataclasses.dataclass(frozen=True)
class Element(Slices):
  """Every value on its own: ``g`` is clipped to ``[-c, c]`` (``optax.clip``).

  A complex value keeps its phase: its modulus is clipped to ``c``.

  Args:
    over: how a value above its threshold is brought under it. ``"clamp"``: set to ``±c``.
      ``"rescale"``: multiplied by ``c / max|g|``, the largest magnitude of its leaf, so the values
      over the threshold keep their order and the largest lands on ``c`` (Stable-SPAM's AdaClip).
  """

  one_group_per_value: ClassVar[bool] = True
  slices_split_like_leaves: ClassVar[bool] = True

  over: Literal["clamp", "rescale"] = "clamp"

  def __post_init__(self):
    check_choice("over", self.over, ("clamp", "rescale"))

  def reduce_axes(self, shape, path="", *, split=False):
    return ()

  def measure(self, tree, axis_names=()) -> Measured:
    # |g| per value; no per-value squares (they would be a second gradient-sized array).
    magnitudes = jax.tree.map(lambda x: jnp.abs(x).astype(norms.accumulation_dtype(x.dtype)), tree)
    leaves = jax.tree.leaves(tree)
    total = distributed.total_across([norms.sum_of_squares(x) for x in leaves], leaves, axis_names)
    return Measured(magnitudes, None, total)

  def clip(self, tree, measured, threshold, axis_names=()):
    threshold = broadcast_like(threshold, measured.norms)
    leaves, treedef = jax.tree.flatten(tree)
    magnitudes = jax.tree.leaves(measured.norms)
    if self.over == "rescale":
      largest = distributed.max_across(
        [jnp.max(m, initial=0.0) for m in magnitudes], leaves, axis_names
      )
    else:
      largest = [None] * len(leaves)

    def clip_leaf(x, magnitude, c, peak):
      acc = norms.accumulation_dtype(x.dtype)
      if peak is not None:
        # Over the threshold: scaled by c / (the leaf's largest magnitude), which is <= 1 there.
        # A zero leaf has nothing over it; the stand-in keeps jax.grad finite there.
        over = norms.exceeds(magnitude, c)
        return norms.scale(x, jnp.where(over, c / jnp.where(peak > 0, peak, 1.0), 1.0))
      if jnp.iscomplexobj(x):
        return norms.scale(x, norms.clip_scale(magnitude, c))
      c = c.astype(acc)
      return jnp.clip(x.astype(acc), -c, c).astype(norms.output_dtype(x.dtype))

    clipped = jax.tree.unflatten(
      treedef,
      [clip_leaf(*args) for args in zip(leaves, magnitudes, jax.tree.leaves(threshold), largest)],
    )
    over = jax.tree.map(norms.exceeds, measured.norms, threshold)
    clipped_leaves = jax.tree.leaves(clipped)
    clipped_squares = distributed.total_across(
      [norms.sum_of_squares(x) for x in clipped_leaves], clipped_leaves, axis_names
    )
    summary = Summary(
      clipped_norm=norms.safe_sqrt(clipped_squares),
      clipped_fraction=_fraction(self._sum(over, axis_names), self._count(over, axis_names)),
    )
    return clipped, summary


GRANULARITIES: dict[str, type[Granularity]] = {
  "global": Global,
  "layer": Layer,
  "unit": Unit,
  "element": Element,
}

GranularityLike = Literal["global", "layer", "unit", "element"] | Granularity


def as_granularity(granularity: GranularityLike) -> Granularity:
  """``"global"``, ``"layer"``, ``"unit"`` or ``"element"`` (with defaults), or a granularity."""
  if isinstance(granularity, Granularity):
    return granularity
  if isinstance(granularity, str):
    if granularity in GRANULARITIES:
      return GRANULARITIES[granularity]()
    raise ValueError(
      f"granularity must be one of {sorted(GRANULARITIES)} or a clipchain.granularity object; "
      f"got {granularity!r}."
    )
  raise TypeError(
    f"granularity must be a str ({sorted(GRANULARITIES)}) or a clipchain.granularity.Granularity; "
    f"got {granularity!r} of type {type(granularity).__name__}."
  )

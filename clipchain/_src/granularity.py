"""Granularity: where a norm is measured, how a threshold is applied there, and how statistics of
many groups are summarised.

A granularity owns the shape of everything that is per group. It turns a tree into *norms*, a pytree
with one entry per group, and every threshold policy works elementwise over that pytree
(``jax.tree.map``) without knowing which granularity produced it:

=============  ======================================  =====================================
granularity    one norm per                            the norms pytree
=============  ======================================  =====================================
``Global``     the whole tree                          a scalar
``Layer``      leaf, group of leaves (a module...), or  a vector, one entry per layer (named)
               slice of a stacked (scanned) layer
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
``clip(tree, measured, threshold, rule, axis_names) -> (clipped tree, Summary)``
  each group scaled by the rule's factor (``min(1, c / norm)`` for the clip rule), and what that
  did;
``summarize(values, axis_names) -> jax.Array``
  a per-group pytree (a threshold, a policy's estimate) as one statistic: itself for a scalar,
  one entry per layer for named groups, else the mean over groups and devices.

:class:`Slices` does all four for granularities with one norm per slice of each leaf; a subclass
says only which axes a slice spans (``reduce_axes``), as :class:`Unit` does.

Two declarations complete a granularity: ``bind(tree)``, called by the core on the tree ``init``
is given, returns the granularity as it applies to that tree (``Layer`` and ``Unit`` fix there the
stacked axes that Flax's partition metadata names, which ``update``'s unboxed arrays no longer
carry); ``check_rule(rule)`` refuses, saying why, a rule that is meaningless at the granularity.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp

from clipchain._src import distributed, norms, stacking
from clipchain._src import layers as layers_lib
from clipchain._src.rules import Clip, Rule
from clipchain._src.tree import NamedLeaf, named_leaves, unboxed_structure
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


def _largest(rule: Rule, values, axis_names) -> list:
  """For each leaf of ``values`` (a granularity's norms), its largest entry across the devices it
  is split over, where the rule asks for it; else ``None``."""
  leaves = jax.tree.leaves(values)
  if not rule.needs_largest:
    return [None] * len(leaves)
  return distributed.max_across([jnp.max(n, initial=0.0) for n in leaves], leaves, axis_names)


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

  @property
  def reports_clipping(self) -> bool:
    """Whether :meth:`clip` returns a :class:`Summary` (else ``None``: the clipped norm and
    fraction are not measured, and not reported) and the core summarises a threshold that differs
    between groups and the policy's estimates (else neither is reported)."""
    return True

  def bind(self, tree) -> Granularity:
    """The granularity as it applies to ``tree``, the tree ``init`` is given.

    The core calls it once, at ``init``, and uses what it returns at every ``update`` (it is kept
    in the state): what can be learnt only from ``init``'s tree, such as the axes Flax's
    partition metadata names, then holds for the unboxed arrays ``update`` is given. The default
    returns the granularity itself.
    """
    del tree
    return self

  def check_rule(self, rule: Rule) -> None:  # noqa: B027
    """Raises ``ValueError`` (saying why) if ``rule`` makes no sense at this granularity; every
    rule is accepted by default."""

  @abc.abstractmethod
  def groups(self, tree) -> Groups:
    """The static structure of the norms of ``tree`` (from shapes only)."""

  @abc.abstractmethod
  def measure(self, tree, axis_names: tuple[str, ...] = ()) -> Measured:
    """The norms of ``tree``, accumulated in float32, summed across ``axis_names``."""

  @abc.abstractmethod
  def clip(self, tree, measured: Measured, threshold, rule: Rule, axis_names: tuple[str, ...] = ()):
    """``(clipped tree, Summary)``: each group scaled by ``rule.factor(norm, c, largest)``;
    ``threshold`` is a scalar or a pytree shaped like ``measured.norms``, all values >= 0, and
    ``largest`` is given where ``rule.needs_largest``."""

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

  def clip(self, tree, measured, threshold, rule, axis_names=()):
    threshold = jnp.asarray(threshold, jnp.float32)
    # One group: the largest norm is its own.
    factor = rule.factor(measured.norms, threshold, measured.norms)
    clipped = jax.tree.map(lambda x: norms.scale(x, factor), tree)
    changed = rule.changes(measured.norms, threshold)
    return clipped, Summary(factor * measured.norms, changed.astype(jnp.float32))

  def summarize(self, values, axis_names=()) -> jax.Array:
    return jnp.asarray(values, jnp.float32)


class StackedLeaves:
  """What the layer and unit granularities share: the stacked (scanned) axes of each leaf.

  Each slice along a leaf's stacked axes is a layer of its own. The axes come from
  ``stacked_axes`` (an int for every leaf, a mapping of path regex to int, or a callable
  ``(path, leaf) -> int``) and, for the leaves it leaves unstacked, from the Flax partition
  metadata of boxed parameters: an axis named ``stacked_axis_name``. :meth:`bind` records them for
  the tree ``init`` sees, so the unboxed arrays of ``update`` are grouped the same way.
  """

  stacked_axes: stacking.StackedSpec
  stacked_axis_name: str | None
  stacked_mesh_axes: tuple[str, ...]
  bound_stacks: tuple[tuple[str, tuple[int, ...]], ...] | None

  def _check_stacking(self) -> None:
    object.__setattr__(self, "stacked_axes", stacking.validate_stacked(self.stacked_axes))
    stacking.validate_axis_name(self.stacked_axis_name)
    mesh_axes = self.stacked_mesh_axes
    names = distributed.as_axis_names(mesh_axes) if mesh_axes else ()
    object.__setattr__(self, "stacked_mesh_axes", names)

  def split_axes(self, x, stacked: tuple[int, ...]) -> tuple[str, ...]:
    """The mesh axes that split the first stacked axis of leaf ``x`` (inside ``shard_map``): the
    declared ``stacked_mesh_axes`` along which ``x`` varies."""
    if not stacked or not self.stacked_mesh_axes:
      return ()
    varying = distributed.varying_axes_of(x)
    return tuple(a for a in self.stacked_mesh_axes if a in varying)

  def bind(self, tree):
    stacks = tuple((leaf.path, self._positions(leaf)) for leaf in named_leaves(tree))
    return dataclasses.replace(self, bound_stacks=stacks)  # type: ignore[type-var]

  def _positions(self, leaf: NamedLeaf) -> tuple[int, ...]:
    return stacking.positions(self.stacked_axes, self.stacked_axis_name, leaf)

  def stacked_axes_of(self, tree) -> list[tuple[int, ...]]:
    """The stacked axes of every leaf of ``tree`` (as ``init``'s tree had them, once bound)."""
    bound = dict(self.bound_stacks or ())
    return [
      bound[leaf.path] if leaf.path in bound else self._positions(leaf)
      for leaf in named_leaves(tree)
    ]


def _other_axes(x, stacked: tuple[int, ...]) -> tuple[int, ...] | None:
  """The axes a leaf's per-slice reduction runs over (``None``, every axis, when unstacked)."""
  if not stacked:
    return None
  return tuple(d for d in range(jnp.ndim(x)) if d not in stacked)


def _slice_factors(factors: jax.Array, first: int, stack: tuple[int, ...], x, stacked):
  """The factors of one leaf's groups, shaped to broadcast against the leaf."""
  if not stack:
    return factors[first]
  shape = [1] * jnp.ndim(x)
  for axis, size in zip(stacked, stack):
    shape[axis] = size
  return factors[first : first + math.prod(stack)].reshape(shape)


@dataclasses.dataclass(frozen=True)
class Layer(StackedLeaves, Granularity):
  """One norm per layer: per leaf by default, or per group of leaves, and per slice of a stacked
  (scanned) layer.

  Args:
    layers: how leaves form layers: ``None`` or ``"leaf"`` (each leaf), ``"module"`` (the leaves
      under one parent node, e.g. a Flax module's kernel and bias), a mapping ``{name: regex}``
      (leaves whose path matches the regex, first match wins), or a callable
      ``(path: str, leaf) -> name``.
    norm: ``"l2"`` (the L2 norm) or ``"rms"`` (the root mean square, as Adafactor's and
      ``optax.clip_by_block_rms``'s update clipping).
    stacked_axes: which leading axes of a leaf index stacked layers (``nn.scan``, ``nnx.vmap``):
      an int (every leaf), a mapping ``{path regex: int}`` (first match; leaves that match none
      are not stacked) or a callable ``(path, leaf) -> int``. Each slice along them is a layer of
      its own, named by its layer's name with the index appended (``params/layers/wi/kernel/3``,
      ``.../3/1`` for two stacked axes); with ``layers="module"``, slice ``i`` of every leaf of
      the module forms layer ``i`` of that module.
    stacked_axis_name: with boxed parameters (``nn.Partitioned``, ``nn.LogicallyPartitioned``,
      NNX sharding metadata), an axis of that name is stacked without being told, in every leaf
      ``stacked_axes`` leaves unstacked; ``None`` turns this off.
    stacked_mesh_axes: inside ``shard_map``, the mesh axes along which the first stacked axis is
      split (each device holds some of the layers, as pipeline stages do). The layers' norms are
      then gathered, so that every device sees every layer under its global index; a leaf
      split along other axes is summed across them as usual (``axis_name`` of the transform).
      Not needed under ``jit`` with sharded arrays.
  """

  named_groups: ClassVar[bool] = True

  layers: layers_lib.LayersSpec = None
  norm: Literal["l2", "rms"] = "l2"
  stacked_axes: stacking.StackedSpec = 0
  stacked_axis_name: str | None = stacking.LAYER_AXIS_NAME
  stacked_mesh_axes: tuple[str, ...] = ()
  bound_stacks: tuple[tuple[str, tuple[int, ...]], ...] | None = dataclasses.field(
    default=None, repr=False
  )

  def __post_init__(self):
    object.__setattr__(self, "layers", layers_lib.validate_layers(self.layers))
    check_choice("norm", self.norm, ("l2", "rms"))
    self._check_stacking()

  def _grouping(self, tree) -> layers_lib.Grouping:
    stacked = self.stacked_axes_of(tree)
    shapes = []
    for x, axes in zip(jax.tree.leaves(tree), stacked):
      shape = [int(jnp.shape(x)[a]) for a in axes]
      if shape:
        shape[0] *= distributed.split_count(self.split_axes(x, axes))
      shapes.append(tuple(shape))
    return layers_lib.resolve(self.layers, tree, stacked, shapes)

  def groups(self, tree) -> Groups:
    names = self._grouping(tree).names
    return Groups(self, names, jax.ShapeDtypeStruct((len(names),), jnp.float32))

  def measure(self, tree, axis_names=()) -> Measured:
    grouping = self._grouping(tree)
    leaves = jax.tree.leaves(tree)
    leaf_squares = [
      norms.sum_of_squares(x, axis=_other_axes(x, stacked))
      for x, stacked in zip(leaves, grouping.leaf_stacked)
    ]
    split = [self.split_axes(x, stacked) for x, stacked in zip(leaves, grouping.leaf_stacked)]
    # Summed across the devices a slice is split over; gathered across those that hold other
    # layers of the stack.
    leaf_squares = distributed.sum_across(leaf_squares, leaves, axis_names, split)
    leaf_squares = [distributed.gather_slices(s, axes) for s, axes in zip(leaf_squares, split)]
    members = grouping.members()
    if not members:
      empty = jnp.zeros((0,), jnp.float32)
      return Measured(empty, empty, jnp.zeros((), jnp.float32))
    if grouping.stacked:
      # As in Slices.measure: without the barrier XLA rewrites the sum of the per-slice sums as a
      # second full reduction of each stacked leaf and writes the squares out to share them.
      # (One barrier per leaf, so that each keeps the mesh axes it varies along.)
      leaf_squares = [jax.lax.optimization_barrier(s) for s in leaf_squares]
    layer_squares = jnp.concatenate(
      [jnp.reshape(norms.total([leaf_squares[i] for i in m]), (-1,)) for m in members]
    )
    if self.norm == "rms":
      sizes = []
      for m, stack in zip(members, grouping.layer_stack):
        size = sum(
          distributed.global_size(leaves[i], tuple({*axis_names, *split[i]})) for i in m
        ) // math.prod(stack)
        sizes.extend([max(size, 1)] * math.prod(stack))
      layer_norms = norms.safe_sqrt(layer_squares / jnp.array(sizes, jnp.float32))
    else:
      layer_norms = norms.safe_sqrt(layer_squares)
    return Measured(layer_norms, layer_squares, jnp.sum(layer_squares))

  def clip(self, tree, measured, threshold, rule, axis_names=()):
    grouping = self._grouping(tree)
    threshold = jnp.broadcast_to(jnp.asarray(threshold, jnp.float32), jnp.shape(measured.norms))
    # The layers' norms are whole on every device: the largest needs no collective.
    largest = jnp.max(measured.norms, initial=0.0) if rule.needs_largest else None
    factors = rule.factor(measured.norms, threshold, largest)
    leaves, treedef = jax.tree.flatten(tree)
    clipped = []
    for i, x in enumerate(leaves):
      first, stack = grouping.leaf_groups(i)
      stacked = grouping.leaf_stacked[i]
      factor = _slice_factors(factors, first, stack, x, stacked)
      if stack:
        size = int(jnp.shape(x)[stacked[0]])
        factor = distributed.local_slices(
          jnp.moveaxis(factor, stacked[0], 0), self.split_axes(x, stacked), size
        )
        factor = jnp.moveaxis(factor, 0, stacked[0])
      clipped.append(norms.scale(x, factor))
    over = rule.changes(measured.norms, threshold)
    # From the L2 norms rather than factor² x squares, which a float32 square can overflow.
    l2 = measured.norms if self.norm == "l2" else norms.safe_sqrt(measured.squares)
    summary = Summary(
      clipped_norm=norms.safe_sqrt(jnp.sum(jnp.square(factors * l2))),
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
      self.reduce_axes(jnp.shape(leaf.leaf), leaf.path, split=_is_split(leaf.leaf, axis_names))
      for leaf in named_leaves(tree)
    ]

  def _stack_split(self, tree) -> list[tuple[str, ...]]:
    """For each leaf, the mesh axes along which it holds other slices than its neighbours (a
    stack split across devices): never summed across, but summarised across."""
    return [()] * len(jax.tree.leaves(tree))

  def _summary_axes(self) -> tuple[str, ...]:
    """The mesh axes ``_stack_split`` may name."""
    return ()

  def groups(self, tree) -> Groups:
    shapes = [
      jax.ShapeDtypeStruct(
        tuple(1 if i in axes else d for i, d in enumerate(jnp.shape(x))), jnp.float32
      )
      for x, axes in zip(jax.tree.leaves(tree), self._axes(tree))
    ]
    return Groups(self, (), jax.tree.unflatten(unboxed_structure(tree), shapes))

  def measure(self, tree, axis_names=()) -> Measured:
    leaves, treedef = jax.tree.leaves(tree), unboxed_structure(tree)
    squares = [
      norms.sum_of_squares(x, axis=axes, keepdims=True)
      for x, axes in zip(leaves, self._axes(tree, axis_names))
    ]
    # Summed across the devices a leaf is split over: a slice split over devices (FSDP over the
    # input dimension of a unit) is measured whole.
    squares = distributed.sum_across(squares, leaves, axis_names, self._stack_split(tree))
    # The barrier keeps XLA from rewriting sum(per-slice sums) as a second full reduction of the
    # leaf, which would make it materialise the squares as a gradient-sized temporary (measured
    # on CPU: 64 MiB and 4x the step time for 8 leaves of 2048x1024).
    # One barrier per leaf: a barrier over several marks each output varying along the mesh axes
    # any of them varies along.
    barriered = [jax.lax.optimization_barrier(s) for s in squares]
    total = distributed.total_across(
      [jnp.sum(s) for s in barriered], barriered, self._summary_axes()
    )
    unit_norms = [norms.safe_sqrt(s) for s in squares]
    return Measured(
      jax.tree.unflatten(treedef, unit_norms), jax.tree.unflatten(treedef, squares), total
    )

  def clip(self, tree, measured, threshold, rule, axis_names=()):
    threshold = broadcast_like(threshold, measured.norms)
    treedef = jax.tree.structure(measured.norms)
    factors = treedef.unflatten(
      [
        rule.factor(n, c, peak)
        for n, c, peak in zip(
          jax.tree.leaves(measured.norms),
          jax.tree.leaves(threshold),
          _largest(rule, measured.norms, axis_names),
        )
      ]
    )
    leaves, tree_def = jax.tree.flatten(tree)
    clipped = tree_def.unflatten(
      [norms.scale(x, f) for x, f in zip(leaves, jax.tree.leaves(factors))]
    )
    over = jax.tree.map(rule.changes, measured.norms, threshold)
    clipped_squares = jax.tree.map(lambda f, n: jnp.square(f * n), factors, measured.norms)
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
    # Whole slices; where a stack is split across devices, each holds other slices.
    return distributed.total_across(sums, leaves, self._summary_axes())

  def _count(self, tree, axis_names) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    axes = axis_names if self.slices_split_like_leaves else self._summary_axes()
    return jnp.asarray(sum(distributed.global_size(x, axes) for x in leaves), jnp.float32)


def _is_split(x, axis_names) -> bool:
  return bool(axis_names and distributed.varying_axes(x, axis_names))


_FLAX_UNIT_AXES = {2: (0,), 3: (0,), 4: (0, 1, 2), 5: (0, 1, 2, 3)}


@dataclasses.dataclass(frozen=True)
class Unit(StackedLeaves, Slices):
  """One norm per output unit of each leaf (the granularity of AGC), in each slice of a stacked
  (scanned) layer.

  A unit is the slice of a weight that feeds one output: all axes but the output axis are reduced.

  Args:
    axis: the axes to reduce, for every leaf; overrides ``layout``. Negative axes count from the
      end; an axis out of range for a leaf, or a stacked axis, is an error.
    layout: ``"flax"`` for ``(..., in, out)`` kernels (Flax, Haiku): scalars and vectors are one
      unit, rank 2 and 3 reduce axis 0, rank 4 (HWIO) axes 0-2, rank 5 axes 0-3, as
      ``optax.adaptive_grad_clip``; ``"torch"`` for ``(out, in, ...)`` weights (PyTorch ports,
      Equinox): every axis but the first is reduced.
    stacked_axes: which leading axes of a leaf index stacked layers, as for
      :class:`Layer`: an int (every leaf), a mapping ``{path regex: int}`` or a callable
      ``(path, leaf) -> int``. They are kept, so each layer of a stack is clipped on its own, and
      the layout applies to the other axes.
    stacked_axis_name: with boxed parameters, an axis of that name in their partition metadata is
      stacked without being told (see :class:`Layer`); ``None`` turns this off.
    stacked_mesh_axes: inside ``shard_map``, the mesh axes along which the first stacked axis is
      split (see :class:`Layer`): each device clips its own layers' units, and the summaries are
      taken over every device's.
  """

  axis: int | Sequence[int] | None = None
  layout: Literal["flax", "torch"] = "flax"
  stacked_axes: stacking.StackedSpec = 0
  stacked_axis_name: str | None = stacking.LAYER_AXIS_NAME
  stacked_mesh_axes: tuple[str, ...] = ()
  bound_stacks: tuple[tuple[str, tuple[int, ...]], ...] | None = dataclasses.field(
    default=None, repr=False
  )

  def __post_init__(self):
    check_choice("layout", self.layout, ("flax", "torch"))
    self._check_stacking()
    if self.axis is not None:
      axes = (self.axis,) if not isinstance(self.axis, Sequence) else tuple(self.axis)
      for a in axes:
        check_int("axis", a, static=True)
      object.__setattr__(self, "axis", tuple(int(a) for a in axes))

  def _axes(self, tree, axis_names=()) -> list[tuple[int, ...]]:
    return [
      self._unit_axes(jnp.shape(leaf.leaf), leaf.path, _is_split(leaf.leaf, axis_names), stacked)
      for leaf, stacked in zip(named_leaves(tree), self.stacked_axes_of(tree))
    ]

  def _stack_split(self, tree) -> list[tuple[str, ...]]:
    return [
      self.split_axes(x, s) for x, s in zip(jax.tree.leaves(tree), self.stacked_axes_of(tree))
    ]

  def _summary_axes(self) -> tuple[str, ...]:
    # Only inside shard_map, where JAX tells which values vary along them.
    return self.stacked_mesh_axes if distributed.tracks_varying_axes() else ()

  def reduce_axes(self, shape, path="", *, split=False):
    stacked = self._positions(NamedLeaf(path, jax.ShapeDtypeStruct(tuple(shape), jnp.float32)))
    return self._unit_axes(tuple(shape), path, split, stacked)

  def _unit_axes(self, shape, path, split, stacked) -> tuple[int, ...]:
    if self.axis is not None:
      given = tuple(self.axis) if isinstance(self.axis, Sequence) else (self.axis,)
      for a in given:
        if not -len(shape) <= a < len(shape):
          raise ValueError(
            f"axis={self.axis} is out of range for leaf {path!r} of shape {shape} (rank "
            f"{len(shape)}); pass axes that every leaf has, or mask the leaves that differ."
          )
      axes = tuple(sorted({a % len(shape) for a in given}))
      if set(axes) & set(stacked):
        raise ValueError(
          f"axis={self.axis} reduces the stacked axes {stacked} of leaf {path!r} of shape "
          f"{shape}; name only axes within one layer, or leave the leaf unstacked."
        )
      return axes
    kept = [d for d in range(len(shape)) if d not in stacked]
    inner = tuple(shape[d] for d in kept)
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
        "(after the stacked axes); pass axis= to say which axes to reduce."
      )
    return tuple(kept[a] for a in axes)


@dataclasses.dataclass(frozen=True)
class Element(Slices):
  """Every value on its own: ``g`` is clipped to ``[-c, c]`` (``optax.clip``).

  A complex value keeps its phase: its modulus is clipped to ``c``. With ``rule="rescale"`` the
  values above the threshold are multiplied by ``c / max|g|`` of their leaf instead, so they keep
  their order (Stable-SPAM's AdaClip). A rule that changes every group (normalising) is refused:
  setting every value's magnitude to the threshold is sign descent.

  Attributes:
    clip_statistics: whether to measure the clipped norm and the fraction of values clipped,
      and, with a threshold that differs between values (SPAM's), its mean and the means of the
      policy's per-value estimates. Each is a reduction over a compare, a ``min`` or an
      expression another kernel also reads, which XLA's CPU backend writes out as a
      gradient-sized array before reducing (a whole extra pass each; see
      ``benchmarks/README.md``); without them the clip fuses into the optimizer's pass and costs
      one read of the gradient, for its norm. A threshold shared by every value is reported
      either way.
  """

  one_group_per_value: ClassVar[bool] = True
  slices_split_like_leaves: ClassVar[bool] = True
  clip_statistics: bool = True

  @property
  def reports_clipping(self) -> bool:
    return self.clip_statistics

  def __repr__(self) -> str:
    return "Element()" if self.clip_statistics else "Element(clip_statistics=False)"

  def check_rule(self, rule: Rule) -> None:
    if rule.changes_every_group:
      raise ValueError(
        f"rule={rule!r} is not meaningful at the Element granularity: each group is one value, "
        "and setting a value's magnitude to the threshold replaces every update by ±threshold "
        "(sign descent). Use rule='clip' or 'rescale' there, or a coarser granularity."
      )

  def reduce_axes(self, shape, path="", *, split=False):
    return ()

  def measure(self, tree, axis_names=()) -> Measured:
    # |g| per value; no per-value squares (they would be a second gradient-sized array).
    leaves = jax.tree.leaves(tree)
    magnitudes = unboxed_structure(tree).unflatten(
      [jnp.abs(x).astype(norms.accumulation_dtype(x.dtype)) for x in leaves]
    )
    total = distributed.total_across([norms.sum_of_squares(x) for x in leaves], leaves, axis_names)
    return Measured(magnitudes, None, total)

  def clip(self, tree, measured, threshold, rule, axis_names=()):
    threshold = broadcast_like(threshold, measured.norms)
    leaves, treedef = jax.tree.flatten(tree)
    magnitudes = jax.tree.leaves(measured.norms)
    largest = _largest(rule, measured.norms, axis_names)

    def clip_leaf(x, magnitude, c, peak):
      if isinstance(rule, Clip) and not jnp.iscomplexobj(x):
        # The clip rule on one value is a clamp, computed exactly as optax.clip does.
        acc = norms.accumulation_dtype(x.dtype)
        c = c.astype(acc)
        return jnp.clip(x.astype(acc), -c, c).astype(norms.output_dtype(x.dtype))
      return norms.scale(x, rule.factor(magnitude, c, peak))

    clipped = jax.tree.unflatten(
      treedef,
      [clip_leaf(*args) for args in zip(leaves, magnitudes, jax.tree.leaves(threshold), largest)],
    )
    if not self.clip_statistics:
      return clipped, None
    over = jax.tree.map(rule.changes, measured.norms, threshold)
    clipped_leaves = jax.tree.leaves(clipped)
    # Not rescued: a conditional would take the clipped values as operands, written out in full;
    # they are at most the threshold, so their squares overflow only for thresholds above 1e19.
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


def as_granularity(
  granularity: GranularityLike, stacked_axes: stacking.StackedSpec = 0
) -> Granularity:
  """``"global"``, ``"layer"``, ``"unit"`` or ``"element"`` (with defaults, and ``stacked_axes``
  for ``"layer"`` and ``"unit"``), or a granularity."""
  stacked = not stacking.is_default(stacked_axes)
  if isinstance(granularity, Granularity):
    if stacked:
      raise ValueError(
        f"stacked_axes={stacked_axes!r} was given beside the granularity object {granularity!r}; "
        "give it to the granularity itself (e.g. Layer(stacked_axes=...))."
      )
    return granularity
  if isinstance(granularity, str):
    if granularity not in GRANULARITIES:
      raise ValueError(
        f"granularity must be one of {sorted(GRANULARITIES)} or a clipchain.granularity object; "
        f"got {granularity!r}."
      )
    cls = GRANULARITIES[granularity]
    if not stacked:
      return cls()
    if not issubclass(cls, StackedLeaves):
      raise ValueError(
        f"stacked_axes applies to the 'layer' and 'unit' granularities; got "
        f"stacked_axes={stacked_axes!r} with granularity={granularity!r}."
      )
    return cls(stacked_axes=stacked_axes)  # type: ignore[call-arg]
  raise TypeError(
    f"granularity must be a str ({sorted(GRANULARITIES)}) or a clipchain.granularity.Granularity; "
    f"got {granularity!r} of type {type(granularity).__name__}."
  )


def measure_robustly(
  granularity: Granularity, tree, axis_names: tuple[str, ...] = ()
) -> tuple[Measured, jax.Array]:
  """``granularity.measure(tree)`` and the tree's global norm, right also where the float32 sum of
  squares overflows (finite values above about 1e19) or underflows to 0 (values all below about
  1e-19).

  Only then, decided by one scalar test of the tree's norm, the tree is measured again with its
  values scaled by a power of two (2**-66 or 2**66: exact, and covering every finite float32), and
  the norms scaled back: a ``lax.cond`` where traced (decided in Python when run eagerly), so the
  common case costs nothing more (under ``vmap`` it becomes a select and both are computed). A NaN
  or an infinity stays what it is. A group that underflows beside others that do not is not
  rescued.
  """
  measured = granularity.measure(tree, axis_names)
  leaves = jax.tree.leaves(tree)
  if granularity.one_group_per_value:
    # A value's magnitude is exact; only the tree's sum of squares (its norm) can overflow. The
    # magnitudes stay out of the conditional, whose outputs XLA writes out as arrays of their own.
    return measured, distributed.norm_of_squares(leaves, measured.total_squares, axis_names)
  total_norm = norms.safe_sqrt(measured.total_squares)
  suspect = distributed.rescue_needed(total_norm) if leaves else None
  if suspect is None:
    return measured, total_norm

  def rescue(_):
    up = distributed.rescue_scale(total_norm)
    scaled = jax.tree.unflatten(jax.tree.structure(tree), distributed.scaled_leaves(leaves, up))
    again = granularity.measure(scaled, axis_names)
    down = 1 / up
    # Squares scaled back in two steps: down² alone can overflow where the squares do not.
    back = lambda s: s * down.astype(s.dtype) * down.astype(s.dtype)
    # Each group keeps its first measurement unless that one came out infinite or 0: a group
    # beside an infinite value (or beside overflowing ones) is right as it was, and measured again
    # scaled down it would underflow.
    pick = lambda again, first: jnp.where(jnp.isinf(first) | (first == 0), again, first)
    rescued = Measured(
      jax.tree.map(lambda n, m: pick(n * down.astype(n.dtype), m), again.norms, measured.norms),
      jax.tree.map(lambda q, m: pick(back(q), m), again.squares, measured.squares),
      pick(back(again.total_squares), measured.total_squares),
    )
    again_norm = norms.safe_sqrt(again.total_squares) * down.astype(total_norm.dtype)
    return rescued, pick(again_norm, total_norm)

  return distributed.rescue_if(suspect, rescue, lambda _: (measured, total_norm))

"""Naming the leaves of a tree the same way whether its parameters are boxed or not.

Flax wraps parameters in boxes: linen's ``nn.Partitioned`` / ``nn.LogicallyPartitioned``
(``AxisMetadata``) and NNX's ``Variable``. ``jax.tree_util`` names a boxed leaf
``.../kernel/value``, and training code sees boxes at one call and plain arrays at the next
(``nnx.Optimizer`` calls ``init`` on Variables and ``update`` on arrays). Everything here names a
leaf by the box's own path, so both give ``"params/Dense_0/kernel"``, and reads the names a box
gives the leaf's axes.
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


def path_str(path) -> str:
  """``('params', 'Dense_0', 'kernel')``-like key paths as ``"params/Dense_0/kernel"``."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      parts.append(str(key.name))
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      parts.append(str(key.key))
    else:
      parts.append(str(key).strip(".[]'\""))
  return "/".join(parts)


def is_nnx_variable(node) -> bool:
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(node, nnx.Variable)


def is_boxed(node) -> bool:
  """A Flax NNX ``Variable``, or a linen box such as ``nn.Partitioned`` (``AxisMetadata``)."""
  meta = sys.modules.get("flax.core.meta")
  return is_nnx_variable(node) or (meta is not None and isinstance(node, meta.AxisMetadata))


def axis_names_of(node) -> tuple | None:
  """The names a box gives its value's axes: linen's ``names`` (``nn.Partitioned``,
  ``nn.LogicallyPartitioned``), NNX's ``out_sharding`` metadata (``sharding`` and
  ``sharding_names`` in older releases); ``None`` for anything else."""
  if is_nnx_variable(node):
    metadata = node.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
      names = metadata.get(key)
      if names is not None:
        return tuple(names)
    return None
  if is_boxed(node):
    names = getattr(node, "names", None)
    return None if names is None else tuple(names)
  return None


class NamedLeaf(NamedTuple):
  """A leaf of a tree with its path string and the names its box gives its axes.

  Attributes:
    path: the leaf's path, ``"params/Dense_0/kernel"`` (a boxed leaf named by its box).
    leaf: the array (or any leaf).
    axis_names: the names a Flax box gives the leaf's axes (``None`` per unnamed axis), or
      ``None`` when the leaf is not boxed.
    key_path: the ``jax.tree_util`` key path the path string was written from.
  """

  path: str
  leaf: Any
  axis_names: tuple | None = None
  key_path: tuple = ()


def named_leaves(tree) -> list[NamedLeaf]:
  """Every leaf of ``tree`` in ``jax.tree.leaves`` order, named through Flax boxes.

  The leaf of an NNX ``Variable`` or of a linen box is named by the box's path, without its
  trailing ``value`` key, so a tree gives the same names boxed (at ``init``) and unboxed (at
  ``update``); the box's axis names come with it.

  Examples:
    >>> import jax.numpy as jnp
    >>> from clipchain.granularity import named_leaves
    >>> [leaf.path for leaf in named_leaves({"dense": {"kernel": jnp.zeros((2, 3))}})]
    ['dense/kernel']
  """
  out: list[NamedLeaf] = []
  for path, node in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_boxed)[0]:
    if is_boxed(node):
      names = axis_names_of(node)
      for inner, x in jax.tree_util.tree_flatten_with_path(node)[0]:
        out.append(NamedLeaf(path_str(path + inner[1:]), x, names, path + inner[1:]))
    else:
      out.append(NamedLeaf(path_str(path), node, None, path))
  return out


def unboxed(tree):
  """``tree`` with every Flax box replaced by the leaves it holds (its one value, or a tuple)."""

  def unbox(node):
    if not is_boxed(node):
      return node
    leaves = jax.tree.leaves(node)
    return leaves[0] if len(leaves) == 1 else tuple(leaves)

  return jax.tree.map(unbox, tree, is_leaf=is_boxed)


def unboxed_structure(tree) -> jax.tree_util.PyTreeDef:
  """The structure of ``tree`` with every Flax box replaced by the leaves it holds: the same for a
  boxed tree (``init`` in Flax's partitioning recipes) and its unboxed arrays (``update``), so a
  state shaped by it fits both."""
  return jax.tree.structure(unboxed(tree))


def leaf_paths(tree) -> list[str]:
  """The path string of every leaf of ``tree``, in ``jax.tree.leaves`` order."""
  return [leaf.path for leaf in named_leaves(tree)]


class TreeSignature:
  """The paths and shapes of a tree's leaves, kept in a state's static fields so that ``update``
  can say what differs from the tree ``init`` saw (compared by a digest, cheap to hash)."""

  __slots__ = ("_key", "leaves", "structure")

  def __init__(self, tree):
    self.leaves = tuple((leaf.path, tuple(jnp.shape(leaf.leaf))) for leaf in named_leaves(tree))
    # The containers too (a tuple for a list, a key 0 for "0"), with a Flax box standing for its
    # array: nnx.Optimizer calls init on Variables and update on arrays.
    self.structure = jax.tree.structure(tree, is_leaf=is_boxed)
    self._key = hash((self.leaves, self.structure))

  def __hash__(self) -> int:
    return self._key

  def __eq__(self, other) -> bool:
    return isinstance(other, TreeSignature) and (
      self is other
      or (
        self._key == other._key
        and self.leaves == other.leaves
        and self.structure == other.structure
      )
    )

  def __repr__(self) -> str:
    shapes = ", ".join(f"{p}: {s}" for p, s in self.leaves[:3])
    more = ", ..." if len(self.leaves) > 3 else ""
    return f"TreeSignature({len(self.leaves)} leaves: {shapes}{more})"

  def difference(self, other: TreeSignature, what: str = "updates") -> str:
    """How ``other`` (the updates, or ``what``) differs from ``self`` (the tree given to init)."""
    mine, theirs = dict(self.leaves), dict(other.leaves)
    parts = []
    if missing := [p for p in mine if p not in theirs]:
      parts.append(f"leaves missing from the {what}: {missing[:5]}")
    if extra := [p for p in theirs if p not in mine]:
      parts.append(f"leaves not in the tree given to init: {extra[:5]}")
    if changed := [
      f"{p}: {mine[p]} -> {theirs[p]}" for p in mine if p in theirs and mine[p] != theirs[p]
    ]:
      parts.append(f"shapes changed: {changed[:5]}")
    if not parts:
      parts.append(
        f"the same leaves in other containers: {self.structure} at init, {other.structure} now"
      )
    return "; ".join(parts)


def check_same_tree(owner: str, expected: TreeSignature, tree, what: str = "updates") -> None:
  """Raises ``ValueError``, saying what differs, if ``tree`` is not shaped like ``expected``."""
  got = TreeSignature(tree)
  if got != expected:
    raise ValueError(
      f"{owner}: the {what} are not shaped like the tree its state was initialised with "
      f"({expected.difference(got, what)}); call init on a tree shaped like the {what}."
    )

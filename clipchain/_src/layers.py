"""Which leaves of a pytree form one layer.

A grouping is resolved against a tree's structure (never its values) into a static
:class:`Grouping`: the layer names in order and, for every leaf, the index of its layer. Paths are
written as ``"params/Dense_0/kernel"``; these strings name layers in statistics too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from clipchain._src import stacking
from clipchain._src.tree import named_leaves, path_str
from clipchain._src.validation import FrozenDict

# What a user may pass as ``layers=``:
#   None               every leaf is its own layer;
#   "leaf" / "module"  every leaf / every parent node (a Flax module: its kernel, bias, ...);
#   {name: regex}      leaves whose path matches a regex (first match in order) form layer ``name``;
#   callable           ``fn(path: str, leaf) -> str`` returns the layer name of a leaf.
LayersSpec = None | str | Mapping[str, str] | Callable[[str, Any], str]

_BY_NAME = ("leaf", "module")


def validate_layers(layers: LayersSpec) -> LayersSpec:
  """Checks a grouping at construction; regexes are compiled here so a typo fails early."""
  if layers is None or callable(layers):
    return layers
  if isinstance(layers, str):
    if layers not in _BY_NAME:
      raise ValueError(
        f"layers must be None, one of {list(_BY_NAME)}, a mapping of layer name to regex, or a "
        f"callable (path, leaf) -> name; got {layers!r}."
      )
    return layers
  if isinstance(layers, Mapping):
    if not layers:
      raise ValueError("layers must not be an empty mapping; got {}.")
    for name, pattern in layers.items():
      if not isinstance(name, str) or not isinstance(pattern, str):
        raise TypeError(
          f"layers must map layer names (str) to regular expressions (str); got {name!r}: "
          f"{pattern!r}."
        )
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(
          f"layers[{name!r}] is not a valid regular expression: {pattern!r} ({e})."
        ) from None
    return FrozenDict(layers)
  raise TypeError(
    f"layers must be None, one of {list(_BY_NAME)}, a mapping of layer name to regex, or a "
    f"callable (path, leaf) -> name; got {layers!r}."
  )


class Grouping(NamedTuple):
  """A resolved grouping.

  A layer is the leaves given one name; when its leaves are stacked (scanned), each slice along
  the stacked axes is a group of its own, named ``layer/i`` (``layer/i/j`` for two stacked axes).

  Attributes:
    names: the name of every group, layer by layer, slices in row-major order.
    leaf_layer: for every leaf, the index of its layer.
    layer_first: for every layer, the index in ``names`` of its first group.
    layer_stack: for every layer, the shape of its stack (``()`` when it is not stacked).
    leaf_stacked: for every leaf, its stacked axes.
  """

  names: tuple[str, ...]
  leaf_layer: tuple[int, ...]
  layer_first: tuple[int, ...]
  layer_stack: tuple[tuple[int, ...], ...]
  leaf_stacked: tuple[tuple[int, ...], ...]

  @property
  def stacked(self) -> bool:
    return any(self.layer_stack)

  def members(self) -> list[list[int]]:
    """For each layer, the indices of its leaves."""
    out: list[list[int]] = [[] for _ in self.layer_first]
    for leaf, layer in enumerate(self.leaf_layer):
      out[layer].append(leaf)
    return out

  def leaf_groups(self, leaf: int) -> tuple[int, tuple[int, ...]]:
    """The first group of leaf ``leaf`` and its stack shape (the groups follow row by row)."""
    layer = self.leaf_layer[leaf]
    return self.layer_first[layer], self.layer_stack[layer]


def resolve(
  layers: LayersSpec,
  tree,
  stacked: list[tuple[int, ...]] | None = None,
  shapes: list[tuple[int, ...]] | None = None,
) -> Grouping:
  """Assigns each leaf of ``tree`` to a layer, and each slice of a stacked leaf to a group, from
  the tree's structure alone. ``stacked``: each leaf's stacked axes (none by default);
  ``shapes``: each leaf's stack shape, where it is not the sizes of those axes (a stack split
  across devices)."""
  flat = named_leaves(tree)
  paths = [leaf.path for leaf in flat]
  if layers is None or layers == "leaf":
    keys = _unambiguous(paths, [leaf.key_path for leaf in flat], "leaves")
  elif layers == "module":
    parents = [leaf.key_path[:-1] if len(leaf.key_path) > 1 else leaf.key_path for leaf in flat]
    keys = _unambiguous([path_str(p) for p in parents], parents, "modules")
  elif isinstance(layers, Mapping):
    keys = [_first_match(layers, path) for path in paths]
  else:
    assert callable(layers)  # validate_layers allows only None, "leaf", "module", maps, callables
    keys = []
    for leaf in flat:
      key = layers(leaf.path, leaf.leaf)
      if not isinstance(key, str):
        raise TypeError(
          f"layers callable must return a str layer name; got {key!r} for {leaf.path!r} (to "
          "split a stacked leaf into its layers, pass stacked_axes=)."
        )
      keys.append(key)
  stacked = stacked if stacked is not None else [()] * len(flat)
  if shapes is None:
    shapes = [tuple(int(np.shape(x.leaf)[a]) for a in axes) for x, axes in zip(flat, stacked)]
  index: dict[str, int] = {}
  for key in keys:
    index.setdefault(key, len(index))
  layer_stack: list[tuple[int, ...] | None] = [None] * len(index)
  first_leaf: list[str] = [""] * len(index)
  for path, key, shape in zip(paths, keys, shapes):
    i = index[key]
    if layer_stack[i] is None:
      layer_stack[i], first_leaf[i] = shape, path
    elif layer_stack[i] != shape:
      raise ValueError(
        f"layer {key!r} holds leaves stacked differently: {first_leaf[i]!r} has the stack shape "
        f"{layer_stack[i]} and {path!r} {shape}; a layer's leaves must be stacked alike (group "
        "the leaves otherwise, or give them their own stacked_axes)."
      )
  names: list[str] = []
  layer_first = []
  for key, stack in zip(index, layer_stack):
    layer_first.append(len(names))
    names.extend(stacking.slice_names(key, stack or ()))
  if len(set(names)) != len(names):
    twice = sorted({n for n in names if names.count(n) > 1})
    raise ValueError(
      f"the groups {twice[:5]} are each named twice (a slice of a stacked layer is named "
      "'layer/i', which another layer is also called); rename a key or group the leaves with a "
      "mapping or a callable (layers=...)."
    )
  return Grouping(
    tuple(names),
    tuple(index[k] for k in keys),
    tuple(layer_first),
    tuple(shape or () for shape in layer_stack),
    tuple(stacked),
  )


def _unambiguous(keys: list[str], paths: list[tuple], what: str) -> list[str]:
  """``keys``, after checking that distinct paths did not write to the same key (a dict key
  ``"a/b"`` and the nested keys ``"a"``, ``"b"`` both read ``"a/b"``), which would merge two
  layers into one."""
  seen: dict[str, tuple] = {}
  for key, path in zip(keys, paths):
    other = seen.setdefault(key, path)
    if other != path:
      raise ValueError(
        f"two {what} of the tree are both written {key!r} (key paths {jax.tree_util.keystr(other)}"
        f" and {jax.tree_util.keystr(path)}), so they cannot be told apart as layers; rename a key "
        "or group the leaves with a mapping or a callable (layers=...)."
      )
  return keys


def _first_match(patterns: Mapping[str, str], path: str) -> str:
  for name, pattern in patterns.items():
    if re.search(pattern, path):
      return name
  raise ValueError(
    f"leaf {path!r} matches none of the layers patterns {dict(patterns)}; add a catch-all "
    "entry such as {'rest': '.*'}."
  )

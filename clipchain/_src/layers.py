"""Which leaves of a pytree form one layer.

A grouping is resolved against a tree's structure (never its values) into a static
:class:`Grouping`: the layer names in order and, for every leaf, the index of its layer. Paths are
written as ``"params/Dense_0/kernel"``; these strings name layers in statistics too.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax

# What a user may pass as ``layers=``:
#   None               every leaf is its own layer;
#   "leaf" / "module"  every leaf / every parent node (a Flax module: its kernel, bias, ...);
#   {name: regex}      leaves whose path matches a regex (first match in order) form layer ``name``;
#   callable           ``fn(path: str, leaf) -> str`` returns the layer name of a leaf.
LayersSpec = None | str | Mapping[str, str] | Callable[[str, Any], str]

_BY_NAME = ("leaf", "module")


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


def flatten_with_path(tree) -> list[tuple[tuple, Any]]:
  """``jax.tree_util.tree_flatten_with_path(tree)[0]``, except that the leaf of a Flax NNX
  ``Variable`` or of a linen box (``nn.Partitioned``) is named by the box's own path, without its
  trailing ``value`` key.

  ``nnx.Optimizer`` calls ``init`` on a state of Variables but ``update`` on plain arrays; both
  must give the same layer names, and ``"module"`` must group a module's kernel and bias, boxed
  or not.
  """
  flat: list[tuple[Any, Any]] = []
  for path, node in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_boxed)[0]:
    if is_boxed(node):
      flat.extend((path + p[1:], x) for p, x in jax.tree_util.tree_flatten_with_path(node)[0])
    else:
      flat.append((path, node))
  return flat


def leaf_paths(tree) -> list[str]:
  """The path string of every leaf of ``tree``, in ``jax.tree.leaves`` order."""
  return [path_str(p) for p, _ in flatten_with_path(tree)]


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
    return dict(layers)
  raise TypeError(
    f"layers must be None, one of {list(_BY_NAME)}, a mapping of layer name to regex, or a "
    f"callable (path, leaf) -> name; got {layers!r}."
  )


class Grouping(NamedTuple):
  """A resolved grouping: ``names[leaf_layer[i]]`` is the layer of leaf ``i``."""

  names: tuple[str, ...]
  leaf_layer: tuple[int, ...]

  @property
  def is_per_leaf(self) -> bool:
    return self.leaf_layer == tuple(range(len(self.leaf_layer)))

  def members(self) -> list[list[int]]:
    """For each layer, the indices of its leaves."""
    out: list[list[int]] = [[] for _ in self.names]
    for leaf, layer in enumerate(self.leaf_layer):
      out[layer].append(leaf)
    return out


def resolve(layers: LayersSpec, tree) -> Grouping:
  """Assigns each leaf of ``tree`` to a layer, from the tree's structure alone."""
  flat = flatten_with_path(tree)
  paths = [path_str(p) for p, _ in flat]
  if layers is None or layers == "leaf":
    keys = _unambiguous(paths, [p for p, _ in flat], "leaves")
  elif layers == "module":
    parents = [p[:-1] if len(p) > 1 else p for p, _ in flat]
    keys = _unambiguous([path_str(p) for p in parents], parents, "modules")
  elif isinstance(layers, Mapping):
    keys = [_first_match(layers, path) for path in paths]
  else:
    assert callable(layers)  # validate_layers allows only None, "leaf", "module", maps, callables
    keys = []
    for path, (_, leaf) in zip(paths, flat):
      key = layers(path, leaf)
      if not isinstance(key, str):
        raise TypeError(f"layers callable must return a str layer name; got {key!r} for {path!r}.")
      keys.append(key)
  names: dict[str, int] = {}
  for key in keys:
    names.setdefault(key, len(names))
  return Grouping(tuple(names), tuple(names[k] for k in keys))


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

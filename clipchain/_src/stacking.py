"""Which axes of a leaf index stacked layers (``nn.scan``, ``nnx.vmap``, ``vmap``-ed blocks).

A model whose blocks are scanned keeps every block's kernel in one leaf with a leading layer axis.
Each slice along the stacked axes is a layer of its own, so a per-layer or per-unit granularity
must keep those axes out of its reductions. What a user may pass as ``stacked_axes=``:

* an int ``k``: the first ``k`` axes of every leaf;
* a mapping ``{path regex: k}``: the first ``k`` axes of the leaves whose path matches the regex
  (first match in order); a leaf that matches none is not stacked;
* a callable ``(path: str, leaf) -> k``.

A leaf the spec leaves unstacked (``k = 0``) is still stacked along the axes its Flax partition
metadata names ``axis_name`` (``"layers"`` by default: what ``nn.scan``'s
``metadata_params={nn.PARTITION_NAME: "layers"}`` and ``nnx.vmap``'s ``transform_metadata`` write).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from clipchain._src.tree import NamedLeaf
from clipchain._src.validation import FrozenDict, check_int, is_concrete

StackedSpec = int | Mapping[str, int] | Callable[[str, Any], int] | None

#: The default name of a stacked axis in Flax partition metadata.
LAYER_AXIS_NAME = "layers"


def validate_stacked(spec: StackedSpec, argname: str = "stacked_axes") -> StackedSpec:
  """Checks a stacked-axes spec at construction; ``None`` is 0, a mapping is frozen.

  ``optax.inject_hyperparams`` passes an int as an array: concrete when ``init`` builds the
  transform (checked here, and the axes it gives are fixed in the state then) and traced when
  ``update`` rebuilds it (kept as it is: ``update`` uses the axes fixed at ``init``).
  """
  if spec is None:
    return 0
  if isinstance(spec, (jax.Array, np.ndarray, np.generic)) and not isinstance(spec, bool):
    if not is_concrete(spec):
      return spec
    check_int(argname, spec, minimum=0)
    return int(spec)
  if callable(spec):
    return spec
  if isinstance(spec, Mapping):
    if not spec:
      raise ValueError(f"{argname} must not be an empty mapping; got {{}}.")
    for pattern, count in spec.items():
      if not isinstance(pattern, str):
        raise TypeError(
          f"{argname} must map path regular expressions (str) to axis counts; got key {pattern!r}."
        )
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(
          f"{argname} key {pattern!r} is not a valid regular expression ({e})."
        ) from None
      check_int(f"{argname}[{pattern!r}]", count, minimum=0, static=True)
    return FrozenDict((p, int(c)) for p, c in spec.items())
  if isinstance(spec, (bool, str)) or not isinstance(spec, (int, np.integer)):
    raise TypeError(
      f"{argname} must be an int, a mapping of path regex to int, or a callable (path, leaf) -> "
      f"int; got {spec!r} of type {type(spec).__name__}."
    )
  check_int(argname, spec, minimum=0, static=True)
  return int(spec)


def validate_axis_name(name: str | None, argname: str = "stacked_axis_name") -> str | None:
  if name is not None and (not isinstance(name, str) or not name):
    raise TypeError(f"{argname} must be a non-empty str or None; got {name!r}.")
  return name


def is_default(spec: StackedSpec) -> bool:
  """Whether ``spec`` stacks nothing by itself (metadata may still name layer axes); a traced
  value (``inject_hyperparams``'s update) counts as the default, its axes were fixed at init."""
  if isinstance(spec, jax.Array) and not is_concrete(spec):
    return True
  if isinstance(spec, (jax.Array, np.ndarray, np.generic)):
    spec = int(spec)
  return spec is None or (isinstance(spec, int) and not isinstance(spec, bool) and spec == 0)


def _count(spec: StackedSpec, leaf: NamedLeaf, argname: str) -> int:
  if spec is None:
    return 0
  if isinstance(spec, int):
    return spec
  if isinstance(spec, Mapping):
    for pattern, count in spec.items():
      if re.search(pattern, leaf.path):
        return count
    return 0
  count = spec(leaf.path, leaf.leaf)
  if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
    raise TypeError(
      f"{argname} callable must return an int >= 0 for every leaf; got {count!r} for {leaf.path!r}."
    )
  return int(count)


def _names_axis(entry, axis_name: str) -> bool:
  return entry == axis_name or (isinstance(entry, tuple) and axis_name in entry)


def positions(
  spec: StackedSpec, axis_name: str | None, leaf: NamedLeaf, argname: str = "stacked_axes"
) -> tuple[int, ...]:
  """The stacked axes of one leaf, in increasing order."""
  ndim = int(np.ndim(leaf.leaf)) if not hasattr(leaf.leaf, "ndim") else int(leaf.leaf.ndim)
  count = _count(spec, leaf, argname)
  if count > ndim:
    raise ValueError(
      f"leaf {leaf.path!r} has {ndim} axes, fewer than the {count} stacked axes that "
      f"{argname}={spec!r} gives it; stack only the leaves that are stacked (a mapping of path "
      "regex to int, or a callable)."
    )
  if count:
    return tuple(range(count))
  if axis_name is not None and leaf.axis_names is not None:
    return tuple(i for i, n in enumerate(leaf.axis_names[:ndim]) if _names_axis(n, axis_name))
  return ()


def slice_names(base: str, stack_shape: tuple[int, ...]) -> list[str]:
  """``base`` for an unstacked group, else ``base/i`` (``base/i/j`` for two axes) per slice."""
  if not stack_shape:
    return [base]
  return [base + "".join(f"/{i}" for i in index) for index in np.ndindex(*stack_shape)]

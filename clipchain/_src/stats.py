"""Statistics: states that report what a transform measured, and one call that collects them all.

A clipchain state is a ``NamedTuple`` (so ``optax.tree.get(state, "norm")`` works) whose trailing
fields are static metadata (its name, the names of its layers). Registering it as a pytree with
those fields in the tree definition keeps every leaf an array, so states pass through ``jit``,
``vmap``, ``lax.scan`` and Orbax like any optax state, while :func:`stats` can still name what it
finds.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import jax.numpy as jnp

from clipchain._src import layers

_REPORTING_TYPES: list[type] = []


def register_state(*static_fields: str):
  """Class decorator: registers a ``NamedTuple`` state whose ``static_fields`` are not leaves.

  The class must define ``report(self) -> dict[str, jax.Array]`` and a ``name`` field.
  """

  def decorate(cls):
    fields = cls._fields
    dynamic = tuple(f for f in fields if f not in static_fields)
    keys = tuple(jax.tree_util.GetAttrKey(f) for f in dynamic)

    def flatten_with_keys(state):
      children = tuple((k, getattr(state, f)) for k, f in zip(keys, dynamic))
      return children, tuple(getattr(state, f) for f in static_fields)

    def flatten(state):
      static = tuple(getattr(state, f) for f in static_fields)
      return tuple(getattr(state, f) for f in dynamic), static

    def unflatten(aux, children):
      return cls(**dict(zip(dynamic, children)), **dict(zip(static_fields, aux)))

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    cls.array_fields = dynamic
    _REPORTING_TYPES.append(cls)
    return cls

  return decorate


def settings_record(description: str) -> dict[str, jax.Array]:
  """A state field that records, as the key of one int8 leaf, what gives the state's arrays their
  meaning (the layers behind a per-layer vector, the quantities in a history).

  A checkpoint holds the key, so restoring it into a transform built with other settings fails
  in Orbax with both keys named, instead of silently reinterpreting the arrays."""
  return {description: jnp.zeros((), jnp.int8)}


def digest(*parts) -> str:
  """A short digest of ``repr(parts)``, the same in every process (unlike ``hash``)."""
  return hashlib.blake2b(repr(parts).encode(), digest_size=6).hexdigest()


def _unwrap(x):
  return x.get_value() if layers.is_nnx_variable(x) else x


def _is_reporting(node) -> bool:
  return isinstance(node, tuple(_REPORTING_TYPES))


def reporting_states(tree):
  """Every clipchain state in ``tree``, outer before inner (a guard before the state it wraps)."""
  for node in jax.tree.leaves(tree, is_leaf=_is_reporting):
    if _is_reporting(node):
      yield node
      for field in node._fields:
        value = getattr(node, field)
        if jax.tree.leaves(value, is_leaf=_is_reporting):
          yield from reporting_states(value)


def stats(opt_state: Any) -> dict[str, jax.Array]:
  """Collects the statistics of every clipchain transform in an optimizer state.

  Walks any optimizer state (``optax.chain`` tuples, ``inject_hyperparams``, ``masked``,
  ``MultiSteps`` and other wrappers, nested arbitrarily) and returns a flat dictionary. Keys are
  ``"{name}/{statistic}"``, where ``name`` is the transform's name (its ``name=`` argument, else the
  function's name); a name that occurs more than once gets ``_1``, ``_2``, ... appended in the
  order the states occur. Per-layer statistics are keyed ``"{name}/{statistic}/{layer path}"``.

  Pure and cheap: it only reads fields, so it can be called inside ``jit`` on the state a step
  returns, without computing any norm a second time.

  Args:
    opt_state: an optimizer state, e.g. the second value returned by ``tx.update``.

  Returns:
    A ``dict`` mapping names to ``jax.Array`` values.

  Examples:
    >>> import jax.numpy as jnp, optax, clipchain
    >>> tx = optax.chain(clipchain.clip_by_global_norm(1.0), optax.sgd(0.1))
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> _, state = tx.update({"w": jnp.array([3.0, 4.0])}, state, params)
    >>> s = clipchain.stats(state)
    >>> float(s["clip_by_global_norm/norm"]), float(s["clip_by_global_norm/clipped_norm"])
    (5.0, 1.0)
  """
  found = list(reporting_states(opt_state))
  seen: dict[str, int] = {}
  used: set[str] = set()
  out: dict[str, jax.Array] = {}
  for node in found:
    # Flax NNX keeps optimizer-state arrays inside Variables (nnx.Optimizer's OptArray).
    node = jax.tree.map(_unwrap, node, is_leaf=layers.is_nnx_variable)
    k = seen.get(node.name, 0)
    prefix = node.name if k == 0 else f"{node.name}_{k}"
    while prefix in used:  # another state may be named "x_1" explicitly: never overwrite it
      k += 1
      prefix = f"{node.name}_{k}"
    seen[node.name] = k + 1
    used.add(prefix)
    for key, value in node.report().items():
      full = f"{prefix}/{key}"
      if full in out:
        raise ValueError(
          f"two statistics are both named {full!r}; give the transforms names that are not "
          f"prefixes of one another's statistics (name=...)."
        )
      out[full] = value
  return out

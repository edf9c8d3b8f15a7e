"""What every clipchain state is: a ``NamedTuple`` pytree whose static fields are not leaves, and
which declares the roles it plays for the statistics and the guards.

A state class is declared with :func:`state`; a field annotated ``Static[...]`` is part of the
pytree's definition (a name, the names of layers, the signature of the tree ``init`` saw) rather
than a leaf, so every leaf is an array and states pass through ``jit``, ``vmap``, ``lax.scan``
and Orbax like any optax state, while :func:`clipchain.stats` can still name what it reports.
The roles are declared on the class, where the guards and the statistics read them:

* every state reports: ``report() -> dict`` and a ``name`` field;
* :attr:`Role.MEASURES_INPUT`: ``input_norm()`` is the global norm of the tree its ``update``
  was given (``None`` when it has none), summed across its ``axis_names`` field, so that a guard
  around it decides from that norm instead of measuring the gradient a second time;
* :attr:`Role.GUARD`: its ``inner_state`` is the state of the transform it guards; an outer guard
  that skips a step restores that inner state but keeps the guard's own record of the step.
"""

from __future__ import annotations

import enum
import hashlib
import typing
from typing import Annotated, TypeVar

import jax
import jax.numpy as jnp

T = TypeVar("T")


class _StaticMarker:
  def __repr__(self) -> str:
    return "STATIC"


STATIC = _StaticMarker()

#: Annotates a state field that is static metadata, not an array: ``name: Static[str] = "clip"``.
Static = Annotated[T, STATIC]


class Role(enum.Enum):
  """What a state declares it can do for the statistics and the guards."""

  MEASURES_INPUT = "measures_input"
  GUARD = "guard"


def _static_fields(cls) -> tuple[str, ...]:
  hints = typing.get_type_hints(cls, include_extras=True)
  return tuple(
    f
    for f in cls._fields
    if typing.get_origin(hints.get(f)) is Annotated and STATIC in hints[f].__metadata__
  )


def state(*roles: Role):
  """Class decorator: a ``NamedTuple`` state whose ``Static[...]`` fields are not leaves.

  The class defines ``report(self) -> dict[str, jax.Array]`` and a ``name`` field, and the
  methods its ``roles`` promise (see the module's docstring).
  """

  def decorate(cls):
    static_fields = _static_fields(cls)
    dynamic = tuple(f for f in cls._fields if f not in static_fields)
    keys = tuple(jax.tree_util.GetAttrKey(f) for f in dynamic)

    def flatten_with_keys(node):
      children = tuple((k, getattr(node, f)) for k, f in zip(keys, dynamic))
      return children, tuple(getattr(node, f) for f in static_fields)

    def flatten(node):
      static = tuple(getattr(node, f) for f in static_fields)
      return tuple(getattr(node, f) for f in dynamic), static

    def unflatten(aux, children):
      return cls(**dict(zip(dynamic, children)), **dict(zip(static_fields, aux)))

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    cls.array_fields = dynamic
    cls.clipchain_roles = frozenset(roles)
    return cls

  return decorate


def is_state(node) -> bool:
  """Whether ``node`` is a clipchain state (declared with :func:`state`)."""
  return isinstance(getattr(type(node), "clipchain_roles", None), frozenset)


def has_role(node, role: Role) -> bool:
  return is_state(node) and role in type(node).clipchain_roles


def keep_dtypes(new, old):
  """``new`` cast to the dtypes of ``old``: a state's dtypes are fixed at ``init`` (under
  ``jax_enable_x64`` a statistic computed from float64 leaves would otherwise turn float64 after
  the first update, and ``lax.scan`` and ``jit``'s cache would see a different state)."""
  return jax.tree.map(lambda n, o: jnp.asarray(n).astype(jnp.result_type(o)), new, old)


def settings_record(description: str) -> dict[str, jax.Array]:
  """A state field that records, as the key of one int8 leaf, what gives the state's arrays their
  meaning (the layers behind a per-layer vector, the quantities in a history).

  A checkpoint holds the key, so restoring it into a transform built with other settings fails
  in Orbax with both keys named, instead of silently reinterpreting the arrays."""
  return {description: jnp.zeros((), jnp.int8)}


def digest(*parts) -> str:
  """A short digest of ``repr(parts)``, the same in every process (unlike ``hash``)."""
  return hashlib.blake2b(repr(parts).encode(), digest_size=6).hexdigest()

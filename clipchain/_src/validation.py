"""Construction-time checks: bad hyperparameters fail early, naming the argument and the value.

A value of the wrong type raises ``TypeError``; a value of the right type that is out of range
raises ``ValueError``. ``optax.inject_hyperparams`` re-creates a transform inside the traced update
with array hyperparameters: a traced value cannot be inspected, so only its shape and dtype are
checked (its value was checked when ``init`` built the transform from the concrete one).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

FLOAT32_MAX = float(np.finfo(np.float32).max)
# Python ints become int32 inside jit (float hyperparameters given as ints too): larger ones would
# overflow there, not here.
INT32_MAX = int(np.iinfo(np.int32).max)


def is_concrete(value) -> bool:
  """Whether ``value`` can be inspected in Python (not a tracer inside ``jit``)."""
  return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(value))


def _describe(value) -> str:
  return f"{value!r} of type {type(value).__name__}"


def _is_array(value) -> bool:
  return isinstance(value, (np.ndarray, np.generic, jax.Array))


def check_number(
  name: str,
  value,
  *,
  low: float = -math.inf,
  high: float = math.inf,
  low_open: bool = False,
  high_open: bool = False,
  allow_inf: bool = False,
) -> None:
  """A real scalar (a Python number or a 0-d numeric array) in a range, not NaN, and finite unless
  ``allow_inf`` (a finite value must also fit in float32, the dtype thresholds are kept in)."""
  if isinstance(value, bool) or (_is_array(value) and np.dtype(value.dtype) == np.bool_):
    raise TypeError(f"{name} must be a number, not a bool; got {value!r}.")
  if _is_array(value):
    # jnp.issubdtype knows bfloat16 is a float (np.issubdtype does not).
    if not jnp.issubdtype(value.dtype, jnp.integer) and not jnp.issubdtype(
      value.dtype, jnp.floating
    ):
      raise TypeError(f"{name} must be a real number; got an array of dtype {value.dtype}.")
    if np.ndim(value) != 0:
      raise ValueError(f"{name} must be a scalar; got an array of shape {np.shape(value)}.")
  elif not isinstance(value, numbers.Real):
    raise TypeError(f"{name} must be a number; got {_describe(value)}.")
  if not is_concrete(value):
    return
  v = float(value)
  if math.isnan(v):
    raise ValueError(f"{name} must not be NaN; got {value!r}.")
  if math.isinf(v) and not allow_inf:
    raise ValueError(f"{name} must be finite; got {value!r}.")
  if math.isfinite(v) and abs(v) > FLOAT32_MAX:
    raise ValueError(f"{name} must fit in float32 (|x| <= {FLOAT32_MAX:.4g}); got {value!r}.")
  if isinstance(value, numbers.Integral) and abs(int(value)) > INT32_MAX:
    raise ValueError(
      f"{name} given as an int must fit in int32 (|x| <= {INT32_MAX}); got {value!r} (pass a "
      "float for larger values)."
    )
  ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
  if not ok:
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    raise ValueError(f"{name} must be in {left}{low}, {high}{right}; got {value!r}.")


def check_non_negative(name: str, value, *, allow_inf: bool = False) -> None:
  """A real scalar >= 0, finite unless ``allow_inf``."""
  check_number(name, value, low=0.0, allow_inf=allow_inf)


def check_int(name: str, value, *, minimum: int | None = None, static: bool = False) -> None:
  """An integer (a Python int or a 0-d integer array) >= ``minimum``.

  ``static``: the value sets a shape or an axis, so it must be known in Python; a traced value
  (``inject_hyperparams``) is refused with the way out.
  """
  is_int_array = _is_array(value) and jnp.issubdtype(value.dtype, jnp.integer)
  if isinstance(value, bool) or not (isinstance(value, numbers.Integral) or is_int_array):
    raise TypeError(f"{name} must be an integer; got {_describe(value)}.")
  if is_int_array and np.ndim(value) != 0:
    raise ValueError(f"{name} must be a scalar; got an array of shape {np.shape(value)}.")
  if not is_concrete(value):
    if static:
      raise TypeError(
        f"{name} sets a shape or an axis and must be a Python int, not a traced array; with "
        f"optax.inject_hyperparams, pass static_args=({name!r},)."
      )
    return
  if minimum is not None and int(value) < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")
  if int(value) > INT32_MAX:
    raise ValueError(f"{name} must fit in int32 (<= {INT32_MAX}); got {value!r}.")


def check_bool(name: str, value) -> None:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be a bool; got {_describe(value)}.")


def check_choice(name: str, value, choices) -> None:
  """One of ``choices`` (strings)."""
  if not isinstance(value, str):
    raise TypeError(f"{name} must be one of {sorted(choices)}; got {_describe(value)}.")
  if value not in choices:
    raise ValueError(f"{name} must be one of {sorted(choices)}; got {value!r}.")


def check_name(value) -> None:
  """A transform's ``name=``: a non-empty string."""
  if not isinstance(value, str):
    raise TypeError(f"name must be a str; got {_describe(value)}.")
  if not value:
    raise ValueError("name must be a non-empty str; got ''.")


def check_callable(name: str, value, what: str) -> None:
  if not callable(value):
    raise TypeError(f"{name} must be callable ({what}); got {_describe(value)}.")


def check_schedule(name: str, schedule) -> None:
  """A callable ``step -> number``: traced once on an int32 step to see that it returns a real
  scalar (a factory such as ``optax.sgd`` passed by mistake returns a transformation)."""
  check_callable(name, schedule, "a schedule step -> number")
  try:
    out = jax.eval_shape(schedule, jax.ShapeDtypeStruct((), jnp.int32))
  except Exception as e:
    raise TypeError(
      f"{name} must be a number or a schedule step -> number; calling {schedule!r} on a step "
      f"failed: {type(e).__name__}: {e}"
    ) from None
  dtype = getattr(out, "dtype", None)
  if dtype is None or not (
    jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
  ):
    raise TypeError(
      f"{name} must be a number or a schedule step -> number; {schedule!r} returned "
      f"{type(out).__name__}."
    )
  if out.shape != ():
    raise ValueError(
      f"{name} must be a schedule returning a scalar; {schedule!r} returned shape {out.shape}."
    )


class FrozenDict(Mapping):
  """A read-only mapping that hashes by its items.

  A granularity's configuration is part of a state's static metadata, which ``jit`` hashes, so a
  mapping given to it is kept as one of these."""

  __slots__ = ("_items", "_lookup")

  def __init__(self, items):
    self._lookup = dict(items)
    self._items = tuple(self._lookup.items())

  def __getitem__(self, key):
    return self._lookup[key]

  def __iter__(self):
    return iter(self._lookup)

  def __len__(self) -> int:
    return len(self._items)

  def __hash__(self) -> int:
    return hash(self._items)

  def __eq__(self, other) -> bool:
    return isinstance(other, Mapping) and dict(self._items) == dict(other.items())

  def __repr__(self) -> str:
    return repr(self._lookup)

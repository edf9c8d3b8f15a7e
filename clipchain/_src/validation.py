"""Construction-time checks: bad hyperparameters fail early, naming the argument and the value."""

from __future__ import annotations

import numbers

import jax
import numpy as np


def is_concrete(value) -> bool:
  """Whether ``value`` can be inspected in Python (not a tracer inside ``jit``).

  ``optax.inject_hyperparams`` re-creates a transform inside the traced update with array
  hyperparameters; those cannot be checked and are trusted as validated at ``init``.
  """
  return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(value))


def check_non_negative(name: str, value, *, allow_inf: bool = False) -> None:
  """Raises ``ValueError`` unless ``value`` is a real number (or array) >= 0 and not NaN."""
  if not is_concrete(value):
    return
  try:
    array = np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a non-negative number; got {value!r}.") from None
  bad = np.isnan(array) | (array < 0)
  if not allow_inf:
    bad |= np.isinf(array)
  if np.any(bad):
    kind = "a finite, non-negative" if not allow_inf else "a non-negative"
    raise ValueError(f"{name} must be {kind} number; got {value!r}.")


def check_in_range(
  name: str, value, low: float, high: float, *, low_open=False, high_open=False
) -> None:
  """Raises ``ValueError`` unless ``low <= value <= high`` (bounds optionally open)."""
  if not is_concrete(value):
    return
  is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
  is_scalar_array = (
    hasattr(value, "dtype") and np.ndim(value) == 0 and np.issubdtype(value.dtype, np.number)
  )
  if not (is_number or is_scalar_array):
    raise ValueError(f"{name} must be a number; got {value!r}.")
  v = float(value)
  ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
  if not ok or np.isnan(v):
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    raise ValueError(f"{name} must be in {left}{low}, {high}{right}; got {value!r}.")


def check_positive_int(name: str, value, *, allow_zero: bool = False) -> None:
  """Raises ``ValueError`` unless ``value`` is an integer > 0 (or >= 0)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{name} must be an integer; got {value!r}.")
  if value < 0 or (value == 0 and not allow_zero):
    bound = ">= 0" if allow_zero else "> 0"
    raise ValueError(f"{name} must be an integer {bound}; got {value!r}.")


def check_choice(name: str, value, choices) -> None:
  """Raises ``ValueError`` unless ``value`` is one of ``choices``."""
  if value not in choices:
    raise ValueError(f"{name} must be one of {sorted(choices)}; got {value!r}.")

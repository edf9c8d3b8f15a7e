"""Norm arithmetic shared by every granularity.

Three rules hold everywhere in clipchain and live only here:

* squares are accumulated in float32 (or wider), never in the gradient's dtype, so bf16 sums do not
  stall and fp16 sums do not overflow;
* the square root and the clip scale are written so that neither the value nor ``jax.grad`` through
  them is NaN at a zero norm or a zero threshold;
* a scale is applied as one fused multiply in float32 and cast back, so updates keep their dtype
  (integer updates come out in float32 rather than truncated) and no gradient-sized temporary is
  created.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp


def accumulation_dtype(dtype) -> jnp.dtype:
  """The dtype squares of ``dtype`` values are summed in: float32, or float64 for float64 input."""
  if jnp.issubdtype(dtype, jnp.complexfloating):
    dtype = jnp.finfo(dtype).dtype
  if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits > 32:
    return jnp.dtype(dtype)
  return jnp.dtype(jnp.float32)


def output_dtype(dtype) -> jnp.dtype:
  """The dtype a clipped update comes out in: its own, except that integers, which a fractional
  scale or threshold cannot be applied to without truncation, come out in float32 (as in optax)."""
  if jnp.issubdtype(dtype, jnp.inexact):
    return jnp.dtype(dtype)
  return accumulation_dtype(dtype)


def squares(x: jax.Array) -> jax.Array:
  """``|x|²`` elementwise, in the accumulation dtype (fused into the consuming reduction)."""
  acc = accumulation_dtype(x.dtype)
  if jnp.iscomplexobj(x):
    x = x.astype(jnp.result_type(acc, jnp.complex64))
    return jnp.real(x * jnp.conj(x))
  x = x.astype(acc)
  return x * x


# Sums of squares already computed for particular arrays (see known_squares): id -> (array, sum).
_KNOWN_SQUARES: contextvars.ContextVar[dict[int, tuple[jax.Array, jax.Array]] | None] = (
  contextvars.ContextVar("known_squares", default=None)
)


@contextlib.contextmanager
def known_squares(arrays: Sequence[jax.Array], sums: Sequence[jax.Array]) -> Iterator[None]:
  """Within the block, :func:`sum_of_squares` of one of ``arrays`` (the very object, over all its
  axes) returns its entry of ``sums`` instead of reading the array again.

  This is how a step that measured the gradients before deciding what to do with them (a guarded
  step, whose decision comes before the ``lax.cond`` that runs the update) lets the clip inside
  reuse that measurement: XLA does not merge a reduction outside a conditional with the same one
  inside it. Matching on identity makes a stale entry impossible to hit: another array, even an
  equal one, is measured as usual.
  """
  known = dict(_KNOWN_SQUARES.get() or {})
  known.update({id(x): (x, s) for x, s in zip(arrays, sums, strict=True)})
  token = _KNOWN_SQUARES.set(known)
  try:
    yield
  finally:
    _KNOWN_SQUARES.reset(token)


def _known_sum(x, axis, keepdims: bool) -> jax.Array | None:
  known = _KNOWN_SQUARES.get()
  entry = None if known is None else known.get(id(x))
  if entry is None or entry[0] is not x or keepdims:
    return None
  ndim = jnp.ndim(x)
  if axis is not None:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if sorted(a % ndim for a in axes) != list(range(ndim)):
      return None
  return entry[1]


def sum_of_squares(x: jax.Array, axis=None, keepdims: bool = False) -> jax.Array:
  """Sum of ``|x|²`` over ``axis``, accumulated in float32 whatever ``x.dtype`` is."""
  known = _known_sum(x, axis, keepdims)
  if known is not None:
    return known
  return jnp.sum(squares(x), axis=axis, keepdims=keepdims)


def total(values: list[jax.Array]) -> jax.Array:
  """Sums equally shaped arrays (scalars, or the per-slice sums of stacked leaves) in one
  reduction (a balanced tree rather than a chain of adds)."""
  if not values:
    return jnp.zeros((), jnp.float32)
  if len(values) == 1:
    return values[0]
  return jnp.sum(jnp.stack(values), axis=0)


def safe_sqrt(x: jax.Array) -> jax.Array:
  """``sqrt(x)`` whose gradient is 0 rather than NaN at ``x == 0``; NaN and Inf stay NaN and Inf."""
  zero = x == 0
  return jnp.where(zero, 0.0, jnp.sqrt(jnp.where(zero, 1.0, x)))


def exceeds(norm: jax.Array, threshold: jax.Array) -> jax.Array:
  """True where ``norm`` is above ``threshold``; also where it is NaN, so a NaN is never hidden."""
  return ~(norm <= threshold)


def clip_scale(norm: jax.Array, threshold: jax.Array) -> jax.Array:
  """``min(1, threshold / norm)``, exactly 1 at or below the threshold.

  Finite (and with finite gradients) at ``norm == 0`` and at ``threshold == 0``; NaN only when
  ``norm`` itself is NaN.
  """
  over = exceeds(norm, threshold)
  return jnp.where(over, threshold / jnp.where(over, norm, 1.0), 1.0)


def scale(x: jax.Array, factor: jax.Array) -> jax.Array:
  """``x * factor`` computed in float32 and cast back to ``x.dtype`` (one fused elementwise op)."""
  acc = accumulation_dtype(x.dtype)
  if jnp.iscomplexobj(x):
    return (x * factor.astype(acc)).astype(x.dtype)
  return (x.astype(acc) * factor.astype(acc)).astype(output_dtype(x.dtype))


# Below float32's largest value by 1/16, so that every per-leaf bound of ``unshared`` is finite and
# above any scalar it is used for.
_UNSHARED_BOUND = float(jnp.finfo(jnp.float32).max) * (1 - 2.0**-4)
# Leaves smaller than this share the broadcast: the array written out is small, and a scalar kernel
# of its own per leaf would cost more compile time (about 10 ms each) than the copy costs.
_UNSHARED_MIN_SIZE = 2**16


def unshared(x: jax.Array, index: int, size: int) -> jax.Array:
  """The scalar ``x`` (finite, below 0.9 x float32's largest value), as a value of leaf ``index``.

  XLA's CPU reduction kernels take a broadcast scalar inside their own kernel only when the
  broadcast is theirs alone: one scalar used in the per-leaf reductions of several equally shaped
  leaves is broadcast once and written out as a leaf-sized array. ``min(x, b)`` with a bound ``b``
  above ``x`` and different for each leaf is ``x`` itself, but an instruction of that leaf alone.
  Leaves of fewer than ``2**16`` values (``size``) get ``x`` as it is.
  """
  if size < _UNSHARED_MIN_SIZE:
    return x
  bound = _UNSHARED_BOUND * (1 + (index % 2**16) * 2.0**-20)
  return jnp.minimum(x, jnp.asarray(bound, x.dtype))

"""Norms across devices: summing float32 squares over named mesh axes, each leaf only over the axes
along which it actually varies.

Inside ``shard_map`` (with ``check_vma=True``, the default) JAX tracks, for every value, the mesh
axes along which it differs between devices: a parameter sharded over ``"model"`` varies along
``"model"``, a replicated one along none. A leaf's sum of squares is summed (``psum``) over the
requested axes it varies along, so a sharded leaf is counted once whole and a replicated leaf is
counted once, not once per device. Where JAX does not track this (``pmap``, ``vmap`` with an axis
name, ``shard_map(check_vma=False)``) every leaf is summed over every requested axis: there, name
only axes along which every leaf is split. Leaves that vary along the same axes are summed locally
first, so a whole tree costs one all-reduce per distinct set of axes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax._src import config as _jax_config

from clipchain._src import norms

AxisName = str | Sequence[str] | None


def as_axis_names(axis_name: AxisName) -> tuple[str, ...]:
  """``"dp"`` or ``("dp", "mp")`` as a tuple of names; ``None`` as ``()``. Raises on bad input."""
  if axis_name is None:
    return ()
  names: tuple[str, ...]
  if isinstance(axis_name, str):
    names = (axis_name,)
  elif isinstance(axis_name, Sequence) and all(isinstance(n, str) for n in axis_name):
    names = tuple(axis_name)
  else:
    raise TypeError(
      f"axis_name must be a mesh axis name (str), a sequence of them, or None; got {axis_name!r} "
      f"of type {type(axis_name).__name__}."
    )
  if not names or not all(names) or len(set(names)) != len(names):
    raise ValueError(
      f"axis_name must be a mesh axis name or a non-empty sequence of distinct names; got "
      f"{axis_name!r}."
    )
  return names


def check_bound(axis_names: tuple[str, ...], owner: str) -> None:
  """Raises ``ValueError`` at trace time unless every name is an axis of the surrounding
  ``shard_map`` or ``pmap``: an unknown name would otherwise be skipped as an axis along which
  nothing varies, and the norms would silently be local."""
  for name in axis_names:
    try:
      jax.lax.axis_size(name)
    except NameError:
      raise ValueError(
        f"{owner}: axis_name {name!r} is not an axis of the surrounding shard_map or pmap (or the "
        "transform is not called inside one). Name the mesh axes the gradients are split over, or "
        "pass axis_name=None under jit with sharded arrays."
      ) from None


def tracks_varying_axes() -> bool:
  """Whether JAX is tracking per-value varying axes (inside ``shard_map(check_vma=True)``)."""
  flag = getattr(_jax_config, "_check_vma", None)
  return bool(flag is not None and flag.value)


def varying_axes_of(x: jax.Array) -> tuple[str, ...]:
  """Every mesh axis along which ``x`` differs between devices where JAX tracks it, else ``()``."""
  if not tracks_varying_axes():
    return ()
  aval = jax.typeof(x)
  vma = getattr(aval, "vma", None)
  if vma is None:
    vma = aval.manual_axis_type.varying
  return tuple(sorted(vma))


def varying_axes(x: jax.Array, axis_names: tuple[str, ...]) -> tuple[str, ...]:
  """The axes of ``axis_names`` along which ``x`` differs between devices (all of them where JAX
  does not track it)."""
  if not axis_names or not tracks_varying_axes():
    return axis_names
  varying = varying_axes_of(x)
  return tuple(a for a in axis_names if a in varying)


def vary_like(x: jax.Array, like: jax.Array) -> jax.Array:
  """``x`` marked as varying along every mesh axis ``like`` varies along (inside ``shard_map``).

  A value broadcast against a per-device array (a threshold shared by a leaf's shard) must count
  as per-device too, or a sum over it would skip the collective its shard needs.
  """
  if not tracks_varying_axes():
    return x
  have = varying_axes_of(x)
  missing = tuple(a for a in varying_axes_of(like) if a not in have)
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def sum_across(
  values: list[jax.Array],
  leaves: list,
  axis_names: tuple[str, ...],
  exclude: list[tuple[str, ...]] | None = None,
) -> list:
  """Each ``values[i]`` (a reduction of ``leaves[i]``) summed over the axes its leaf varies along,
  except the axes ``exclude[i]`` (along which the values are different slices, not parts of one).

  One collective per distinct set of axes, carrying all the values of that set.
  """
  return _reduce_across(jax.lax.psum, values, leaves, axis_names, exclude)


def max_across(values: list[jax.Array], leaves: list, axis_names: tuple[str, ...]) -> list:
  """Each ``values[i]`` (a max over ``leaves[i]``) maxed over the axes its leaf varies along."""
  return _reduce_across(jax.lax.pmax, values, leaves, axis_names)


def _reduce_across(collective, values, leaves, axis_names, exclude=None) -> list:
  if not axis_names:
    return list(values)
  by_axes: dict[tuple[str, ...], list[int]] = {}
  for i, leaf in enumerate(leaves):
    skip = exclude[i] if exclude else ()
    axes = tuple(a for a in varying_axes(leaf, axis_names) if a not in skip)
    by_axes.setdefault(axes, []).append(i)
  out = list(values)
  for axes, members in by_axes.items():
    if axes:
      summed = collective([values[i] for i in members], axes)
      for i, value in zip(members, summed):
        out[i] = value
  return out


def total_across(values: list[jax.Array], leaves: list, axis_names: tuple[str, ...]) -> jax.Array:
  """``sum(values)`` across leaves and devices: partial sums per axis set, one psum each."""
  if not axis_names:
    return norms.total(values)
  by_axes: dict[tuple[str, ...], list[jax.Array]] = {}
  for value, leaf in zip(values, leaves):
    by_axes.setdefault(varying_axes(leaf, axis_names), []).append(value)
  partials = []
  for axes, members in by_axes.items():
    partial = norms.total(members)
    partials.append(jax.lax.psum(partial, axes) if axes else partial)
  return norms.total(partials)


def gather_slices(local: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  """The per-slice values of a leaf whose axis 0 is split over the mesh axes ``axes``, whole on
  every device: each device's block written at its place in zeros and summed (a ``psum``, so the
  result is the same on every device as JAX's varying-axes tracking requires)."""
  if not axes:
    return local
  count = math.prod(jax.lax.axis_size(a) for a in axes)
  size = local.shape[0]
  whole = jnp.zeros((size * count, *local.shape[1:]), local.dtype)
  whole = jax.lax.dynamic_update_slice_in_dim(
    vary_like(whole, local), local, jax.lax.axis_index(axes) * size, axis=0
  )
  return jax.lax.psum(whole, axes)


def local_slices(whole: jax.Array, axes: tuple[str, ...], size: int) -> jax.Array:
  """This device's ``size`` entries along axis 0 of ``whole`` when axis 0 is split over ``axes``."""
  if not axes:
    return whole
  return jax.lax.dynamic_slice_in_dim(whole, jax.lax.axis_index(axes) * size, size, axis=0)


def split_count(axes: tuple[str, ...]) -> int:
  """How many devices the mesh axes ``axes`` split a leaf over (1 for none)."""
  return math.prod(jax.lax.axis_size(a) for a in axes) if axes else 1


def global_size(leaf, axis_names: tuple[str, ...]) -> int:
  """The number of values of ``leaf`` across the devices it is split over."""
  axes = varying_axes(leaf, axis_names)
  return leaf.size * math.prod(jax.lax.axis_size(a) for a in axes)


def mean_across(x: jax.Array, axis_names: tuple[str, ...]) -> jax.Array:
  """A scalar such as the loss averaged over devices (NaN anywhere makes it NaN everywhere)."""
  x = jnp.asarray(x, jnp.float32)
  axes = varying_axes(x, axis_names)
  return jax.lax.pmean(x, axes) if axes else x


# The rescue's scales: 2**66 brings values whose squares underflow (below about 1e-19) near 1;
# 2**-66 brings any finite float32 (below 3.4e38) under 4.6e18, whose squares and their sums stay
# finite. Powers of two, so the scaling is exact.
_RESCUE_EXPONENT = 66


def rescue_scale(norm: jax.Array) -> jax.Array:
  """The power of two the values are multiplied by to measure them again, where their float32
  norm came out infinite (scaled down) or 0 (scaled up). No pass over the values: a fixed scale
  covers the whole float32 range either way."""
  exponent = jnp.where(jnp.isinf(norm), -_RESCUE_EXPONENT, _RESCUE_EXPONENT)
  return jax.lax.stop_gradient(jnp.exp2(exponent.astype(jnp.float32)))


def scaled_leaves(leaves: list, up: jax.Array) -> list:
  """Each leaf times ``up`` (a power of two, 2**-66 or 2**66) in its accumulation dtype, each with
  its own copy of ``up``: a scalar shared by the reductions of equally shaped leaves is written out
  as a leaf-sized array on XLA's CPU backend (see :func:`clipchain._src.norms.unshared`; below
  2**16 values, where a kernel per leaf costs more compile time than the copy costs memory, the
  leaves share it: at most 256 KiB, allocated whether or not the rescue branch is taken)."""
  return [
    x * norms.unshared(up, i, x.size).astype(norms.accumulation_dtype(x.dtype))
    for i, x in enumerate(leaves)
  ]


def rescue_needed(norm: jax.Array) -> jax.Array | None:
  """The scalar test that decides whether a norm accumulated in float32 must be computed again,
  scaled: its sum of squares overflowed or came out 0. ``None`` where the test may differ between
  devices (it cannot then guard collectives). Taken on the norm, not on the sum of squares: a sum
  read by one consumer alone is fused into it, so the test adds no kernel per leaf."""
  suspect = jnp.isinf(norm) | (norm == 0)
  return None if varying_axes_of(suspect) else suspect


def rescue_if(suspect: jax.Array, rescue, keep):
  """``lax.cond(suspect, rescue, keep, None)`` where traced; run eagerly, the branch is chosen in
  Python instead: a ``cond`` outside ``jit`` compiles both branches as one program for every new
  tree, where the eager operations it replaces are each compiled once for all trees."""
  if isinstance(suspect, jax.core.Tracer):
    return jax.lax.cond(suspect, rescue, keep, None)
  return rescue(None) if bool(suspect) else keep(None)


def global_norm(leaves: list, axis_names: tuple[str, ...] = ()) -> jax.Array:
  """The L2 norm of ``leaves`` across devices, accumulated in float32; right also where the float32
  sum of squares of finite values overflows or underflows (then, only then, computed again with
  the values scaled by :func:`rescue_scale`, in :func:`rescue_if`). NaN and Inf stay so."""
  total = total_across([norms.sum_of_squares(x) for x in leaves], leaves, axis_names)
  return norm_of_squares(leaves, total, axis_names)


def norm_of_squares(leaves: list, total: jax.Array, axis_names: tuple[str, ...] = ()) -> jax.Array:
  """The L2 norm of ``leaves`` from ``total``, their float32 sum of squares across devices:
  ``sqrt(total)``, or where that sum overflowed or came out 0, the norm measured again scaled."""
  norm = norms.safe_sqrt(total)
  suspect = rescue_needed(norm) if leaves else None
  if suspect is None:
    return norm

  def rescue(_):
    up = rescue_scale(norm)
    scaled = scaled_leaves(leaves, up)
    again = total_across([norms.sum_of_squares(x) for x in scaled], leaves, axis_names)
    return norms.safe_sqrt(again) / up.astype(norm.dtype)

  return rescue_if(suspect, rescue, lambda _: norm)

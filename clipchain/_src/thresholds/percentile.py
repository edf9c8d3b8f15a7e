"""A threshold at a percentile of the recent norms (AutoClip)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from clipchain._src.granularity import Granularity, Groups
from clipchain._src.thresholds.base import Context, ThresholdPolicy
from clipchain._src.validation import check_in_range, check_positive_int


class PercentileState(NamedTuple):
  """State of :class:`Percentile`.

  Attributes:
    history: a ring buffer of the last ``window`` finite pre-clip norms, ``(window,)`` float32, or
      ``(layers, window)`` with the layer granularity; only the first ``history_length`` slots are
      valid until the buffer has wrapped.
    position: the slot the next norm is written to (int32).
    history_length: how many slots hold a norm, at most ``window`` (int32).
  """

  history: jax.Array
  position: jax.Array
  history_length: jax.Array

  def report(self) -> dict[str, jax.Array]:
    return {"history_length": self.history_length.astype(jnp.float32)}


def _percentile(values: jax.Array, valid: jax.Array, q: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The ``q``-quantile of the valid values of each row, interpolated linearly as
  ``np.percentile``, and the number of valid values per row (a row without any gives ``inf``)."""
  count = jnp.sum(valid, axis=-1, dtype=jnp.int32)
  ordered = jnp.sort(jnp.where(valid, values, jnp.inf), axis=-1)  # valid values first
  index = q * jnp.maximum(count - 1, 0).astype(jnp.float32)
  lower = jnp.floor(index)
  t = index - lower
  lower = lower.astype(jnp.int32)
  upper = jnp.minimum(lower + 1, jnp.maximum(count - 1, 0))
  a = jnp.take_along_axis(ordered, lower[..., None], axis=-1)[..., 0]
  b = jnp.take_along_axis(ordered, upper[..., None], axis=-1)[..., 0]
  # np.percentile's lerp: from whichever end is nearer, so that it is exact at t = 0 and t = 1.
  diff = b - a
  return jnp.where(t >= 0.5, b - diff * (1 - t), a + diff * t), count


class Percentile(ThresholdPolicy):
  """A threshold at a percentile of the last ``window`` norms: the policy of AutoClip.

  Each update's pre-clip norm is appended to a history of at most ``window`` norms (a ring buffer:
  the oldest is overwritten), and the threshold is the ``percentile``-th percentile of that
  history, interpolated linearly as ``np.percentile``.

  * ``include_current=True`` (the paper): the history includes the current norm, so the first
    update is never clipped (its threshold is its own norm) and, at ``percentile=100``, no update
    is.
  * ``include_current=False`` (the ``autoclip`` package's ``QuantileClip``): the threshold comes
    from the previous norms only. The first update, with an empty history, is not clipped; its
    reported threshold is its own norm rather than ``inf`` (the same result: a group at or below
    its threshold is left exactly as is), so the statistics stay finite.

  A non-finite norm never enters the history (the core keeps this state when the tree's norm is
  not finite); with ``include_current=True`` a non-finite current norm is also left out of its
  percentile, so the reported threshold is that of the stored norms.

  Cost: the state holds ``window`` float32 values per group (``window * layers`` with the layer
  granularity: 40 KB per layer for the default 10,000) and each update sorts them. Percentiles
  per unit or per value would need a window per unit or per value and are refused.

  Args:
    percentile: the percentile of the history, in ``[0, 100]`` (the paper recommends 10).
    window: how many recent norms the history holds, a positive integer (the paper keeps every
      norm; a fixed size is needed under ``jit``).
    include_current: whether the current norm is part of the history its threshold is taken from.

  Examples:
    >>> import jax.numpy as jnp, clipchain
    >>> tx = clipchain.clip_norm(clipchain.thresholds.Percentile(50.0, window=3))
    >>> state = tx.init({"w": jnp.zeros(1)})
    >>> for g in (1.0, 3.0, 2.0, 9.0):
    ...   u, state = tx.update({"w": jnp.array([g])}, state)
    >>> u["w"]  # the median of the last three norms, 3, 2 and 9
    Array([3.], dtype=float32)
  """

  def __init__(
    self, percentile: float = 10.0, *, window: int = 10_000, include_current: bool = True
  ):
    if isinstance(percentile, (str, bytes, bool)):
      raise ValueError(f"percentile must be a number in [0, 100]; got {percentile!r}.")
    check_in_range("percentile", percentile, 0.0, 100.0)
    if isinstance(window, jax.Array):
      raise ValueError(
        f"window sets the shape of the history and must be a Python int; got {window!r} (with "
        "optax.inject_hyperparams, pass static_args=('window',))."
      )
    check_positive_int("window", window)
    if not isinstance(include_current, bool):
      raise ValueError(f"include_current must be a bool; got {include_current!r}.")
    self.percentile = percentile
    self.window = window
    self.include_current = include_current

  def __repr__(self) -> str:
    return (
      f"Percentile({self.percentile!r}, window={self.window}, "
      f"include_current={self.include_current})"
    )

  def check_granularity(self, granularity: Granularity) -> None:
    if granularity.name not in ("global", "layer"):
      raise ValueError(
        f"Percentile keeps a window of {self.window} norms per group: at granularity="
        f"{granularity.name!r} that is window x the number of "
        f"{'units' if granularity.name == 'unit' else 'values'} floats of state (and a sort of "
        "them every update); use granularity='global' or 'layer'."
      )

  def init(self, groups: Groups) -> PercentileState:
    return PercentileState(
      history=jnp.zeros((*groups.norms.shape, self.window), jnp.float32),
      position=jnp.zeros((), jnp.int32),
      history_length=jnp.zeros((), jnp.int32),
    )

  def __call__(self, norms, state: PercentileState, context: Context):
    del context
    norms = jnp.asarray(norms, jnp.float32)
    slots = jnp.arange(self.window)
    history = jnp.where(slots == state.position, norms[..., None], state.history)
    new_state = PercentileState(
      history=history,
      position=(state.position + 1) % self.window,
      history_length=jnp.minimum(state.history_length + 1, self.window),
    )
    if self.include_current:
      # A non-finite current norm is left out: its group's threshold comes from the stored norms.
      current = jnp.isfinite(norms)
      values = jnp.where(current[..., None], history, state.history)
      length = jnp.where(current, new_state.history_length, state.history_length)
    else:
      values, length = state.history, state.history_length
    valid = jnp.broadcast_to(slots < length[..., None], values.shape)
    q = jnp.asarray(self.percentile, jnp.float32) / 100.0
    threshold, count = _percentile(values, valid, q)
    return jnp.where(count > 0, threshold, norms), new_state

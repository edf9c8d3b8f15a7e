"""A threshold at a percentile of the recent norms (AutoClip)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from clipchain._src.granularity import Granularity, Groups
from clipchain._src.thresholds.base import Context, ThresholdPolicy, map_groups, zeros_like_norms
from clipchain._src.validation import check_bool, check_int, check_number


class PercentileState(NamedTuple):
  """State of :class:`Percentile`; each field is a pytree shaped like the norms.

  Attributes:
    history: per group, a ring buffer of its last ``window`` positive, finite pre-clip norms
      (the norm's shape plus a trailing ``window`` axis, float32); only the first
      ``history_length`` slots are valid until the buffer has wrapped. It says which norm is the
      oldest, to be dropped next.
    ordered: per group, the same norms in ascending order, then ``inf`` in the slots not yet
      filled: kept sorted by one insertion and one removal per update, so no update sorts.
    position: per group, the slot its next norm is written to (int32).
    history_length: per group, how many slots hold a norm, at most ``window`` (int32).
  """

  history: Any
  ordered: Any
  position: Any
  history_length: Any


def interpolate(ordered: jax.Array, count: jax.Array, q: jax.Array) -> jax.Array:
  """The ``q``-quantile of the first ``count`` values of each ascending row, interpolated linearly
  as ``np.percentile`` (from whichever end is nearer, so that it is exact at the ends)."""
  index = q * jnp.maximum(count - 1, 0).astype(jnp.float32)
  lower = jnp.floor(index)
  t = index - lower
  lower = lower.astype(jnp.int32)
  upper = jnp.minimum(lower + 1, jnp.maximum(count - 1, 0))
  a = jnp.take_along_axis(ordered, lower[..., None], axis=-1)[..., 0]
  b = jnp.take_along_axis(ordered, upper[..., None], axis=-1)[..., 0]
  diff = b - a
  return jnp.where(t >= 0.5, b - diff * (1 - t), a + diff * t)


def _remove(ordered: jax.Array, value: jax.Array) -> jax.Array:
  """``ordered`` without one copy of ``value`` (which it holds), ``inf`` appended at the end."""
  at = jnp.sum(ordered < value[..., None], axis=-1, keepdims=True)  # its first copy
  after = jnp.concatenate([ordered[..., 1:], jnp.full_like(ordered[..., :1], jnp.inf)], axis=-1)
  return jnp.where(jnp.arange(ordered.shape[-1]) < at, ordered, after)


def _insert(ordered: jax.Array, value: jax.Array) -> jax.Array:
  """``value`` inserted into ``ordered`` (whose last slot is a free ``inf``), order kept."""
  at = jnp.sum(ordered <= value[..., None], axis=-1, keepdims=True)
  before = jnp.concatenate([ordered[..., :1], ordered[..., :-1]], axis=-1)
  slots = jnp.arange(ordered.shape[-1])
  return jnp.where(slots < at, ordered, jnp.where(slots == at, value[..., None], before))


@dataclasses.dataclass(frozen=True)
class Percentile(ThresholdPolicy):
  """A threshold at a percentile of the last ``window`` norms: the policy of AutoClip.

  Each update's pre-clip norm is appended to its group's history of at most ``window`` norms (a
  ring buffer: the oldest is overwritten), and the threshold is the ``percentile``-th percentile of
  that history, interpolated linearly as ``np.percentile``.

  * ``include_current=True`` (the paper): the history includes the current norm, so the first
    update is never clipped (its threshold is its own norm) and, at ``percentile=100``, no update
    is.
  * ``include_current=False`` (the ``autoclip`` package's ``QuantileClip``): the threshold comes
    from the previous norms only. The first update, with an empty history, is not clipped; its
    reported threshold is its own norm rather than ``inf`` (the same result: a group at or below
    its threshold is left exactly as is), so the statistics stay finite.

  A norm that is zero or not finite never enters a history: a zero norm (a frozen or unused
  layer) says nothing about the group's scale, and a window of zeros would clip the group to 0
  when its gradient comes back. (The core also keeps the whole state when the tree's norm is not
  finite.) With ``include_current=True`` such a current norm is left out of its own percentile too.

  Cost: the state holds ``window`` float32 values per group twice (in arrival order and sorted),
  and each update inserts the new norm into the sorted copy and removes the oldest, one pass over
  the window each instead of a sort; a granularity whose groups grow with the leaves (units,
  values) is refused.

  Args:
    percentile: the percentile of the history, in ``[0, 100]`` (the paper recommends 10).
    window: how many recent norms the history holds, a positive integer (the paper keeps every
      norm; a fixed size is needed under ``jit``). It sets the state's shape, so ``init`` needs its
      value; ``update`` reads it from the state.
    include_current: whether the current norm is part of the history its threshold is taken from.

  Examples:
    >>> import jax.numpy as jnp, clipchain
    >>> tx = clipchain.clip_norm(clipchain.thresholds.Percentile(50.0, window=3))
    >>> state = tx.init({"w": jnp.zeros(1)})
    >>> for g in (1.0, 3.0, 2.0, 9.0):
    ...   u, state = tx.update({"w": jnp.array([g])}, state)
    >>> u["w"]  # the median of the last three norms, 3, 2 and 9
    Array([3.], dtype=float32)

  References:
    Seetharaman et al., `AutoClip: Adaptive Gradient Clipping for Source Separation Networks
    <https://arxiv.org/abs/2007.14469>`_, 2020
  """

  percentile: float = 10.0
  _: dataclasses.KW_ONLY
  window: int = 10_000
  include_current: bool = True

  def __post_init__(self):
    check_number("percentile", self.percentile, low=0.0, high=100.0)
    check_int("window", self.window, minimum=1)
    check_bool("include_current", self.include_current)

  def check_granularity(self, granularity: Granularity) -> None:
    if granularity.groups_grow_with_size:
      raise ValueError(
        f"Percentile keeps a window of {self.window} norms per group: at {granularity!r}, whose "
        "groups grow with the size of the leaves (units, values), that is twice window times the "
        "parameters in state and a pass over them every update; use granularity='global' or "
        "'layer'."
      )

  def init(self, groups: Groups) -> PercentileState:
    window = int(self.window)
    history = zeros_like_norms(groups, extra_shape=(window,))
    return PercentileState(
      history=history,
      ordered=jax.tree.map(lambda h: jnp.full_like(h, jnp.inf), history),
      position=zeros_like_norms(groups, jnp.int32),
      history_length=zeros_like_norms(groups, jnp.int32),
    )

  def __call__(self, norms, state: PercentileState, context: Context):
    q = jnp.asarray(self.percentile, jnp.float32) / 100.0
    threshold, *fields = map_groups(functools.partial(self._step, q), 5, norms, *state)
    return threshold, PercentileState(*fields)

  def _step(self, q, norm, history, ordered, position, length):
    norm = jnp.asarray(norm, jnp.float32)
    window = history.shape[-1]
    observed = jnp.isfinite(norm) & (norm > 0)
    slots = jnp.arange(window)
    at_position = slots == position[..., None]
    written = jnp.where(at_position, norm[..., None], history)
    new_history = jnp.where(observed[..., None], written, history)
    # Once the window is full, the norm the new one overwrites leaves the sorted copy.
    oldest = jnp.sum(jnp.where(at_position, history, 0.0), axis=-1)
    full = (length >= window)[..., None]
    kept = jnp.where(full, _remove(ordered, oldest), ordered)
    new_ordered = jnp.where(observed[..., None], _insert(kept, norm), ordered)
    new_position = jnp.where(observed, (position + 1) % window, position)
    new_length = jnp.where(observed, jnp.minimum(length + 1, window), length)
    values, count = (new_ordered, new_length) if self.include_current else (ordered, length)
    threshold = jnp.where(count > 0, interpolate(values, count, q), norm)
    return threshold, new_history, new_ordered, new_position, new_length

  def statistics(self, state: PercentileState) -> dict[str, Any]:
    return {"history_length": jax.tree.map(lambda n: n.astype(jnp.float32), state.history_length)}

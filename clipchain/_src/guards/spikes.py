"""Skipping steps whose gradient norm or loss spikes above its recent history."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from clipchain._src import distributed
from clipchain._src import state as state_lib
from clipchain._src.guards import skipping
from clipchain._src.state import Static
from clipchain._src.validation import (
  check_bool,
  check_choice,
  check_int,
  check_name,
  check_number,
  is_concrete,
)

WATCHABLE = ("grad_norm", "loss")


@state_lib.state(state_lib.Role.GUARD, state_lib.Role.MEASURES_INPUT)
class SkipSpikesState(NamedTuple):
  """State of :func:`skip_spikes`.

  Attributes:
    inner_state: the wrapped transform's state, as it was after the last applied step.
    history: the recent finite values of each watched quantity, a ring buffer
      ``(len(watch), window)`` (float32).
    position: where the next value is written in the ring buffer (int32).
    filled: how many entries of the buffer hold values (int32).
    last: the last value of each watched quantity (float32).
    zscore: how many standard deviations above the window's mean the last value was (float32;
      0 until the history is long enough).
    skipped: whether the last step was skipped (bool).
    total_skipped: the number of steps skipped so far (int32).
    settings: records the watched quantities as the key of one int8 leaf, so that restoring a
      checkpoint into a guard that watches others fails in Orbax instead of mixing histories.
    name: the name under which :func:`clipchain.stats` reports (static).
    watch: the watched quantities (static).
    axis_names: the mesh axes the guard decides across (static).
  """

  inner_state: Any
  history: jax.Array
  position: jax.Array
  filled: jax.Array
  last: jax.Array
  zscore: jax.Array
  skipped: jax.Array
  total_skipped: jax.Array
  settings: dict[str, jax.Array]
  name: Static[str] = "skip_spikes"
  watch: Static[tuple[str, ...]] = ("grad_norm",)
  axis_names: Static[tuple[str, ...]] = ()

  def input_norm(self) -> jax.Array | None:
    if "grad_norm" not in self.watch:
      return None
    return self.last[..., self.watch.index("grad_norm")]

  def report(self) -> dict[str, jax.Array]:
    out = {
      "skipped": self.skipped.astype(jnp.float32),
      "total_skipped": self.total_skipped.astype(jnp.float32),
      "history_length": self.filled.astype(jnp.float32),
    }
    for i, quantity in enumerate(self.watch):
      out[f"{quantity}"] = self.last[..., i]
      out[f"{quantity}_zscore"] = self.zscore[..., i]
    return out


def skip_spikes(
  inner: optax.GradientTransformation,
  *,
  sigma: float = 6.0,
  window: int = 128,
  min_history: int | None = None,
  watch: Sequence[str] = ("grad_norm",),
  record_skipped: bool = True,
  name: str = "skip_spikes",
  axis_name: distributed.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  """Skips a step whose gradient norm (or loss) is a spike against its recent history.

  A step is skipped when a watched value ``x`` exceeds ``mean + sigma * std`` of the last
  ``window`` values (mean and population standard deviation, as OLMo-core's and MaxText's
  ``skip_step_on_spikes``), or is not finite. A skipped step leaves no trace, as with
  :func:`skip_nonfinite`: zero update, inner state kept bit for bit. Unlike those implementations:

  * a non-finite value never enters the window (one NaN would otherwise make the mean NaN and
    every following step of a window skip, or none);
  * every finite value enters it, skipped or not, by default (``record_skipped=True``: what
    OLMo-core's ``SkipStepOptimizer``, whose ``latest_loss`` setter appends every step's value,
    and Levanter's ``SkipStepConfig``, which writes every step into its rolling buffer, do), so a
    lasting change of level is absorbed within a window instead of skipping every step from then
    on (with two watched quantities a step enters when both are finite, so the rows stay
    aligned). The price: a skipped spike widens the window's standard deviation, and a repeat of
    it a few steps later can pass. ``record_skipped=False`` keeps skipped values out, so a repeat
    is judged against the quiet history and skipped too; a lasting change of level is then
    skipped until something else ends it (a run of skips shows in ``total_skipped``);
  * the gradient norm is the one a clipchain clip at the head of ``inner`` already computed, not a
    second reduction over the gradient.

  Args:
    inner: the transform to guard.
    sigma: how many standard deviations above the mean make a spike, > 0.
    window: how many recent values the mean and standard deviation are taken over, >= 2.
    min_history: how many values must be in the window before any step is skipped, >= 2
      (default: half the window, at least 2, as OLMo-core); until then only non-finite steps are
      skipped. With fewer, the standard deviation of one value is 0 and every rise is a spike.
    watch: ``"grad_norm"`` and/or ``"loss"``; the loss comes from ``update(..., loss=loss)``.
    record_skipped: whether the values of a skipped step enter the window (see above).
    name: the name under which :func:`clipchain.stats` reports.
    axis_name: inside ``shard_map`` or ``pmap``, the mesh axis name(s) over which gradients are
      split or the loss differs, so that every device takes the same decision; give the clip in
      ``inner`` the same ``axis_name``. Not needed under ``jit`` with sharded arrays.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, optax, clipchain
    >>> tx = clipchain.skip_spikes(optax.sgd(0.1), window=8, min_history=4, sigma=3.0)
    >>> params = {"w": jnp.zeros(1)}
    >>> state = tx.init(params)
    >>> for g in [1.0, 1.1, 0.9, 1.0, 1.05, 50.0]:
    ...   updates, state = tx.update({"w": jnp.array([g])}, state, params)
    >>> bool(state.skipped), int(state.total_skipped)
    (True, 1)

  References:
    Groeneveld et al., `OLMo: Accelerating the Science of Language Models
    <https://arxiv.org/abs/2402.00838>`_, 2024 (OLMo-core's ``skip_step_on_spikes``)
  """
  check_number("sigma", sigma, low=0.0, low_open=True)
  check_int("window", window, minimum=2)
  if min_history is not None:
    check_int("min_history", min_history, minimum=2)
    if is_concrete((min_history, window)) and min_history > window:
      raise ValueError(f"min_history must be at most window={window}; got {min_history!r}.")
  if isinstance(watch, str) or not isinstance(watch, Sequence):
    raise TypeError(f"watch must be a sequence of {list(WATCHABLE)}; got {watch!r}.")
  if not watch or len(set(watch)) != len(watch):
    raise ValueError(
      f"watch must be a non-empty sequence of distinct {list(WATCHABLE)}; got {watch!r}."
    )
  for quantity in watch:
    check_choice("watch", quantity, WATCHABLE)
  if is_concrete(record_skipped):
    check_bool("record_skipped", record_skipped)
  watch = tuple(watch)
  check_name(name)
  inner = skipping.check_inner(inner)
  axis_names = distributed.as_axis_names(axis_name)

  def init_fn(params):
    k = len(watch)
    return SkipSpikesState(
      inner_state=inner.init(params),
      # The window sets the history's shape: init needs its value, update reads it from the state.
      history=jnp.zeros((k, int(window)), jnp.float32),
      position=jnp.zeros((), jnp.int32),
      filled=jnp.zeros((), jnp.int32),
      last=jnp.zeros((k,), jnp.float32),
      zscore=jnp.zeros((k,), jnp.float32),
      skipped=jnp.zeros((), jnp.bool_),
      total_skipped=jnp.zeros((), jnp.int32),
      settings=state_lib.settings_record("watch_" + "_and_".join(watch)),
      name=name,
      watch=watch,
      axis_names=axis_names,
    )

  def judge(state, norm, extra_args):
    size = state.history.shape[-1]
    least = min(max(size // 2, 2), size) if min_history is None else min_history
    values = []
    for quantity in watch:
      if quantity == "grad_norm":
        values.append(norm)
      else:
        loss = skipping.as_scalar_loss(extra_args.get("loss"), axis_names)
        if loss is None:
          raise ValueError(f"{name} watches the loss: call update(..., loss=loss).")
        values.append(loss)
    x = jnp.stack(values).astype(jnp.float32)

    valid = jnp.arange(size) < state.filled
    count = jnp.maximum(state.filled, 1).astype(jnp.float32)
    mean = jnp.sum(jnp.where(valid, state.history, 0.0), axis=-1) / count
    var = jnp.sum(jnp.where(valid, (state.history - mean[:, None]) ** 2, 0.0), axis=-1) / count
    std = jnp.sqrt(var)
    ready = state.filled >= least
    zscore = jnp.where(ready, (x - mean) / jnp.where(std > 0, std, 1.0), 0.0)
    finite = jnp.all(jnp.isfinite(x))
    spike = ready & jnp.any(x - mean > sigma * std)
    ok = finite & ~spike
    skipping.check_same_decision(ok, name)

    # A finite value enters the window (a skipped one only with record_skipped); a non-finite one
    # never does.
    enters = finite & (ok | jnp.asarray(record_skipped, jnp.bool_))
    written = state.history.at[:, state.position].set(x)
    judged = state._replace(
      history=jnp.where(enters, written, state.history),
      position=jnp.where(enters, (state.position + 1) % size, state.position),
      filled=jnp.where(enters, jnp.minimum(state.filled + 1, size), state.filled),
      last=x,
      zscore=zscore,
      skipped=~ok,
      total_skipped=state.total_skipped + (~ok).astype(jnp.int32),
    )
    return ok, skipping.keep_own_dtypes(judged, state)

  guard = skipping.Guard(inner, judge, name, SkipSpikesState, axis_names)
  return skipping.guard_transform(guard, init_fn)

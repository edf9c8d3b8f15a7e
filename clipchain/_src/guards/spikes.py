"""Skipping steps whose gradient norm or loss spikes above its recent history."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from clipchain._src import distributed
from clipchain._src import stats as stats_lib
from clipchain._src.guards import skipping
from clipchain._src.validation import (
  check_choice,
  check_int,
  check_name,
  check_non_negative,
  is_concrete,
)

WATCHABLE = ("grad_norm", "loss")


@stats_lib.register_state("name", "watch", "axis_names")
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
  name: str = "skip_spikes"
  watch: tuple[str, ...] = ("grad_norm",)
  axis_names: tuple[str, ...] = ()

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


skipping.GUARD_STATES.append(SkipSpikesState)


def skip_spikes(
  inner: optax.GradientTransformation,
  *,
  sigma: float = 6.0,
  window: int = 128,
  min_history: int | None = None,
  watch: Sequence[str] = ("grad_norm",),
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
  * every finite value enters it, skipped or not, so a lasting change of level is absorbed within a
    window instead of skipping every step from then on, and a skip never causes later skips (with
    two watched quantities a step enters when both are finite, so the rows stay aligned);
  * the gradient norm is the one a clipchain clip at the head of ``inner`` already computed, not a
    second reduction over the gradient.

  Args:
    inner: the transform to guard.
    sigma: how many standard deviations above the mean make a spike.
    window: how many recent values the mean and standard deviation are taken over.
    min_history: how many values must be in the window before any step is skipped (default: half
      the window, at least 2, as OLMo-core); until then only non-finite steps are skipped.
    watch: ``"grad_norm"`` and/or ``"loss"``; the loss comes from ``update(..., loss=loss)``.
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
  check_non_negative("sigma", sigma)
  check_int("window", window, minimum=1)
  if min_history is not None:
    check_int("min_history", min_history, minimum=1)
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
      settings=stats_lib.settings_record("watch_" + "_and_".join(watch)),
      name=name,
      watch=watch,
      axis_names=axis_names,
    )

  def update_fn(updates, state, params=None, **extra_args):
    distributed.check_bound(axis_names, name)
    size = state.history.shape[-1]
    least = min(max(size // 2, 2), size) if min_history is None else min_history
    new_updates, new_inner, norm = skipping.run_inner(
      inner, updates, state.inner_state, params, extra_args, axis_names
    )
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

    # Every finite value enters the window, skipped or not; a non-finite one never does.
    written = state.history.at[:, state.position].set(x)
    new_state = SkipSpikesState(
      inner_state=skipping.select_state(ok, new_inner, state.inner_state),
      history=jnp.where(finite, written, state.history),
      position=jnp.where(finite, (state.position + 1) % size, state.position),
      filled=jnp.where(finite, jnp.minimum(state.filled + 1, size), state.filled),
      last=x,
      zscore=zscore,
      skipped=~ok,
      total_skipped=state.total_skipped + (~ok).astype(jnp.int32),
      settings=state.settings,
      name=state.name,
      watch=state.watch,
      axis_names=state.axis_names,
    )
    return skipping.decide(ok, new_updates, new_state, state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

"""Skipping steps whose gradient (or loss) is NaN or infinite."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from clipchain._src import distributed
from clipchain._src import state as state_lib
from clipchain._src.guards import skipping
from clipchain._src.state import Static
from clipchain._src.validation import check_int, check_name


@state_lib.state(state_lib.Role.GUARD, state_lib.Role.MEASURES_INPUT)
class SkipNonFiniteState(NamedTuple):
  """State of :func:`skip_nonfinite`.

  Attributes:
    inner_state: the wrapped transform's state, as it was after the last applied step.
    grad_norm: the global L2 norm of the last step's gradient, skipped or not (float32; reused
      from a clip at the head of ``inner`` where there is one).
    skipped: whether the last step was skipped (bool).
    total_skipped: the number of steps skipped so far (int32).
    consecutive_skipped: the number of steps skipped since the last applied one (int32).
    limit_exceeded: whether ``consecutive_skipped`` ever went past ``max_consecutive`` (bool,
      sticky); always False without a limit.
    name: the name under which :func:`clipchain.stats` reports (static).
    max_consecutive: the limit (static; -1 when there is none).
    axis_names: the mesh axes the guard decides across (static).
  """

  inner_state: Any
  grad_norm: jax.Array
  skipped: jax.Array
  total_skipped: jax.Array
  consecutive_skipped: jax.Array
  limit_exceeded: jax.Array
  name: Static[str] = "skip_nonfinite"
  max_consecutive: Static[int] = -1
  axis_names: Static[tuple[str, ...]] = ()

  def input_norm(self) -> jax.Array:
    return self.grad_norm

  def report(self) -> dict[str, jax.Array]:
    return {
      "skipped": self.skipped.astype(jnp.float32),
      "total_skipped": self.total_skipped.astype(jnp.float32),
      "consecutive_skipped": self.consecutive_skipped.astype(jnp.float32),
      "limit_exceeded": self.limit_exceeded.astype(jnp.float32),
    }


def skip_nonfinite(
  inner: optax.GradientTransformation,
  *,
  max_consecutive: int | None = None,
  name: str = "skip_nonfinite",
  axis_name: distributed.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  """Skips every step whose gradient, or loss, holds a NaN or an infinity.

  On such a step the update is zero and the inner state is kept bit for bit: after the run the
  parameters and the optimizer state equal those of a run that never saw the bad batch (the inner
  step count does not advance, no moment absorbs the NaN; guards nested in ``inner`` still record
  the step in their own statistics). The decision is made inside the compiled step, from the norm
  a clipchain clip at the head of ``inner`` already computed (one reduction over the gradient
  otherwise). A gradient of finite values is never skipped: where its float32 sum of squares
  overflows (values above about 1e19), the norm is measured again, scaled.

  With ``max_consecutive``, a run of more than that many skipped steps sets ``limit_exceeded``,
  reported by :func:`clipchain.stats` and checked by :func:`clipchain.check_guards` (under
  ``jax.experimental.checkify``), so a run that has gone bad does not go on silently skipping.

  Args:
    inner: the transform to guard, e.g. ``optax.chain(clipchain.clip_by_global_norm(1.0),
      optax.adam(1e-3))``.
    max_consecutive: how many steps in a row may be skipped before ``limit_exceeded`` is set.
    name: the name under which :func:`clipchain.stats` reports.
    axis_name: inside ``shard_map`` or ``pmap``, the mesh axis name(s) over which gradients are
      split or the loss differs, so that every device takes the same decision; give the clip in
      ``inner`` the same ``axis_name``. Not needed under ``jit`` with sharded arrays.

  Returns:
    An ``optax.GradientTransformationExtraArgs``: ``update(updates, state, params, loss=...)``
    also checks the loss when given (other extra arguments are passed on to ``inner``).

  Examples:
    >>> import jax.numpy as jnp, optax, clipchain
    >>> tx = clipchain.skip_nonfinite(optax.chain(clipchain.clip_by_global_norm(1.0),
    ...                                           optax.adam(0.1)))
    >>> params = {"w": jnp.ones(2)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.array([jnp.nan, 1.0])}, state, params)
    >>> optax.apply_updates(params, updates)["w"]
    Array([1., 1.], dtype=float32)
    >>> int(clipchain.stats(state)["skip_nonfinite/total_skipped"])
    1
  """
  if max_consecutive is not None:
    check_int("max_consecutive", max_consecutive, minimum=0, static=True)
    max_consecutive = int(max_consecutive)
  check_name(name)
  inner = skipping.check_inner(inner)
  axis_names = distributed.as_axis_names(axis_name)

  def init_fn(params):
    return SkipNonFiniteState(
      inner_state=inner.init(params),
      grad_norm=jnp.zeros((), jnp.float32),
      skipped=jnp.zeros((), jnp.bool_),
      total_skipped=jnp.zeros((), jnp.int32),
      consecutive_skipped=jnp.zeros((), jnp.int32),
      limit_exceeded=jnp.zeros((), jnp.bool_),
      name=name,
      max_consecutive=-1 if max_consecutive is None else max_consecutive,
      axis_names=axis_names,
    )

  def judge(state, norm, extra_args):
    ok = jnp.isfinite(norm)
    loss = skipping.as_scalar_loss(extra_args.get("loss"), axis_names)
    if loss is not None:
      ok &= jnp.isfinite(loss)
    skipping.check_same_decision(ok, name)
    consecutive = jnp.where(ok, 0, state.consecutive_skipped + 1)
    exceeded = state.limit_exceeded
    if max_consecutive is not None:
      exceeded |= consecutive > max_consecutive
    judged = state._replace(
      grad_norm=norm.astype(jnp.float32),
      skipped=~ok,
      total_skipped=state.total_skipped + (~ok).astype(jnp.int32),
      consecutive_skipped=consecutive,
      limit_exceeded=exceeded,
    )
    return ok, skipping.keep_own_dtypes(judged, state)

  guard = skipping.Guard(inner, judge, name, SkipNonFiniteState, axis_names)
  return skipping.guard_transform(guard, init_fn)

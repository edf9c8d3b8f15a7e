"""A guarded training step: measure once, decide once, and run the whole step or none of it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from clipchain._src import distributed, norms
from clipchain._src.guards import skipping
from clipchain._src.state import keep_dtypes

Step = Callable[..., tuple[Any, Any]]


def _guards(guard) -> tuple[list[skipping.Guard], optax.GradientTransformationExtraArgs]:
  """The guards nested directly in one another, outermost first, and what the innermost wraps."""
  parts = skipping.guard_of(guard)
  if parts is None:
    raise TypeError(
      "guard must be a clipchain.skip_nonfinite or clipchain.skip_spikes transform (possibly "
      f"one around the other); got {guard!r} of type {type(guard).__name__}."
    )
  levels = []
  while parts is not None:
    levels.append(parts)
    parts = skipping.guard_of(parts.inner)
  return levels, levels[-1].inner


def guarded_step(guard: optax.GradientTransformation) -> Step:
  """The training step of a guard: the update and its application under one ``lax.cond``.

  ``guard`` is a :func:`clipchain.skip_nonfinite` or :func:`clipchain.skip_spikes` transform
  (one may wrap the other). The step it returns does what ::

    updates, opt_state = guard.update(grads, opt_state, params, **extra_args)
    params = optax.apply_updates(params, updates)

  does, with the same decisions, counters and statistics and the same state (``guard.init``'s, so
  checkpoints and :func:`clipchain.stats` are unchanged), but decides *before* the update: it
  measures the gradient once (per-leaf sums of squares, reused by a clipchain clip at the head of
  the inner chain, so the gradients are read once for the norm in all), judges the step with
  every guard, and only then runs the inner update and ``apply_updates`` in the branch of a
  ``lax.cond`` that the other branch skips with parameters and inner state passed through
  untouched. The transform form cannot do this: it returns updates for the caller to apply, so it
  must compute the inner update first and then select between new and old state, leaf by leaf,
  which on XLA's CPU backend makes the optimizer's moments be recomputed and copied (3.4x an Adam
  step against 1.1x here; see ``benchmarks/README.md``).

  Guards nested directly in one another are judged alike: each records every step it judged (its
  counters and history advance even when another guard skips the step), and the inner
  optimizer's state advances only when all of them let the step through. A guard elsewhere inside
  ``inner`` (after a transform that changes the gradient) cannot be judged before the update runs
  and is refused. Under ``vmap`` the ``lax.cond`` becomes a select, as in the transform form.

  Args:
    guard: the guard transform; call ``guard.init(params)`` for the state the step takes.

  Returns:
    ``step(params, opt_state, grads, **extra_args) -> (params, opt_state)``, to be jitted, with
    ``params`` and ``opt_state`` donated where the caller wants them updated in place. Extra
    arguments go to the inner transforms, and ``loss=`` is also judged, as in the transform form.

  Raises:
    TypeError: ``guard`` is not a ``skip_nonfinite`` or ``skip_spikes`` transform.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, clipchain
    >>> guard = clipchain.skip_nonfinite(
    ...     optax.chain(clipchain.clip_by_global_norm(1.0), optax.adam(0.1)))
    >>> step = jax.jit(clipchain.guarded_step(guard), donate_argnums=(0, 1))
    >>> params = {"w": jnp.ones(2)}
    >>> opt_state = guard.init(params)
    >>> params, opt_state = step(params, opt_state, {"w": jnp.array([jnp.nan, 1.0])})
    >>> params["w"], int(clipchain.stats(opt_state)["skip_nonfinite/total_skipped"])
    (Array([1., 1.], dtype=float32), 1)
  """
  levels, inner = _guards(guard)

  def step(params, opt_state, grads, **extra_args):
    states = [opt_state]
    for level in levels:
      if not isinstance(states[-1], level.state_type):
        raise TypeError(
          f"guarded_step: opt_state must be the state guard.init(params) returns, with a "
          f"{level.state_type.__name__} for {level.name!r}; got {type(states[-1]).__name__}."
        )
      distributed.check_bound(level.axis_names, level.name)
      states.append(states[-1].inner_state)
    inner_state = states[-1]
    nested = [
      s
      for s in jax.tree.leaves(inner_state, is_leaf=skipping.is_guard_state)
      if skipping.is_guard_state(s)
    ]
    if nested:
      raise ValueError(
        f"guarded_step: the transform inside {levels[-1].name!r} holds the guard "
        f"{nested[0].name!r} after a transform that changes the gradient; it cannot judge the step "
        "before the update runs. Nest guards directly in one another (skip_spikes(skip_nonfinite("
        "...))), or use the guard as a transform."
      )

    leaves = jax.tree.leaves(grads)
    squares = [norms.sum_of_squares(x) for x in leaves]
    # Innermost first, as the transform form judges them, each from the norm the transform form
    # measures where no clip gave it one (global_norm, here taking the sums above).
    judged = []
    apply = None
    with norms.known_squares(leaves, squares):
      for level, state in reversed(list(zip(levels, states))):
        norm = distributed.global_norm(leaves, level.axis_names)
        ok, new_state = level.judge(state, norm, extra_args)
        judged.append(new_state)
        apply = ok if apply is None else apply & ok

    def run(operands):
      params, inner_state, grads, squares = operands
      with norms.known_squares(jax.tree.leaves(grads), squares):
        updates, new_inner = inner.update(grads, inner_state, params, **extra_args)
      return optax.apply_updates(params, updates), keep_dtypes(new_inner, inner_state)

    def skip(operands):
      params, inner_state, _, _ = operands
      return params, inner_state

    params, new_state = jax.lax.cond(apply, run, skip, (params, inner_state, grads, squares))
    for state in judged:  # innermost first
      new_state = state._replace(inner_state=new_state)
    return params, new_state

  return step

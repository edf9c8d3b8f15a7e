"""What every guard shares: run the inner update, then keep it or leave no trace of it.

The decision is a traced boolean, so it lives inside the compiled program (a Python branch on a
value that differs across hosts would deadlock their collectives). Skipping selects the old inner
state leaf by leaf, so the inner optimizer's state, step count included, is kept bit for bit, and
returns an update of negative zeros: ``p + (-0.0) == p`` for every ``p``, signed zeros included,
so ``optax.apply_updates`` leaves every bit of the parameters as it was. (A positive zero would
turn a ``-0.0`` parameter into ``+0.0``; multiplying by 0 would keep a NaN, ``0 * NaN = NaN``.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from clipchain._src import distributed
from clipchain._src.state import Role, has_role, keep_dtypes


def skip_update(updates):
  """An update that changes nothing when added: negative zeros shaped like ``updates``."""
  return jax.tree.map(lambda u: jnp.full_like(u, -0.0), updates)


def select(keep_new: jax.Array, new, old):
  """``new`` where ``keep_new`` else ``old``, leaf by leaf (a select, never a multiply)."""
  return jax.tree.map(lambda n, o: jnp.where(keep_new, n, o), new, old)


# Wrappers whose inner transform sees the whole of the wrapper's input. Not ``optax.masked``: a clip
# under a mask measures only part of the tree.
TRANSPARENT_STATES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def is_guard_state(node) -> bool:
  """A guard's state (declared ``Role.GUARD``): it records the norm of its last input itself,
  because on a skipped step its ``inner_state`` is the old one, whose clip statistics describe an
  earlier step."""
  return has_role(node, Role.GUARD)


def select_state(keep_new: jax.Array, new, old):
  """The inner state a guard keeps: ``new`` where ``keep_new`` else ``old``, leaf by leaf.

  The statistics of guards nested inside (counters, histories) are taken from ``new`` either way:
  each guard records every step it judged, even one that an outer guard then skips; the state of
  the optimizer they wrap is restored all the same.
  """

  def pick(n, o):
    if is_guard_state(n):
      return n._replace(inner_state=select_state(keep_new, n.inner_state, o.inner_state))
    return jnp.where(keep_new, n, o)

  return jax.tree.map(pick, new, old, is_leaf=is_guard_state)


def keep_own_dtypes(new_state, old_state):
  """A guard's new state with its own fields in the dtypes ``init`` gave them (the inner state is
  the inner transform's to keep)."""
  return new_state._replace(
    **{
      f: keep_dtypes(getattr(new_state, f), getattr(old_state, f))
      for f in type(new_state).array_fields
      if f != "inner_state"
    }
  )


# judge(state, norm, extra_args) -> (keep_new, state): whether the step is applied, and the guard's
# state with its own fields updated for this step and its inner state as it was.
Judge = Callable[[Any, jax.Array, dict[str, Any]], tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class Guard:
  """What a guard is made of: the transform it wraps and how it judges a step.

  The transform form (:func:`guard_transform`) and :func:`clipchain.guarded_step` are two ways of
  running the same three pieces, so they decide alike.
  """

  inner: optax.GradientTransformationExtraArgs
  judge: Judge
  name: str
  state_type: type
  axis_names: tuple[str, ...] = ()


def guard_transform(guard: Guard, init_fn) -> optax.GradientTransformationExtraArgs:
  """The guard as a transform: the inner update always computed, then kept or replaced by an
  update that changes nothing, and the inner state selected leaf by leaf."""

  def update_fn(updates, state, params=None, **extra_args):
    distributed.check_bound(guard.axis_names, guard.name)
    new_updates, new_inner, norm = run_inner(
      guard.inner, updates, state.inner_state, params, extra_args, guard.axis_names
    )
    ok, judged = guard.judge(state, norm, extra_args)
    new_state = judged._replace(inner_state=select_state(ok, new_inner, state.inner_state))
    return select(ok, new_updates, skip_update(new_updates)), new_state

  # The pieces travel with the transform, for guarded_step to take apart.
  update_fn.clipchain_guard = guard  # type: ignore[attr-defined]
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def guard_of(tx) -> Guard | None:
  """The pieces of a transform built by :func:`guard_transform`; ``None`` for anything else."""
  return getattr(getattr(tx, "update", None), "clipchain_guard", None)


def input_norm(inner_state, axis_names: tuple[str, ...] = ()) -> jax.Array | None:
  """The pre-clip norm that a clip at the head of the inner chain measured on this step's input.

  Follows the first element of ``optax.chain`` states and the inner state of transparent wrappers
  (``inject_hyperparams``) down to a state that declares ``Role.MEASURES_INPUT`` (a clip, a
  monitor, a nested guard, which recorded the norm it measured or reused); ``None`` when the input
  does not go through one first (or its ``input_norm()`` is ``None``: a ``skip_spikes`` that does
  not watch the gradient norm), or when that norm was summed across other mesh axes than the
  guard's ``axis_names`` (reusing it would let devices decide differently), so the caller must
  measure it itself.
  """
  node = inner_state
  while True:
    if has_role(node, Role.MEASURES_INPUT):
      if axis_names and node.axis_names != axis_names:
        return None
      return node.input_norm()
    if isinstance(node, TRANSPARENT_STATES):
      node = node.inner_state
    elif type(node) is tuple and node:  # optax.chain's state: the first transform sees the input
      node = node[0]
    else:
      return None


def run_inner(
  inner: optax.GradientTransformationExtraArgs,
  updates,
  inner_state,
  params,
  extra_args,
  axis_names: tuple[str, ...] = (),
) -> tuple[Any, Any, jax.Array]:
  """The inner update, and the norm of ``updates`` (reused from a clip at the chain's head).

  A reused norm is global already when that clip was given the same ``axis_name``.
  """
  new_updates, new_inner = inner.update(updates, inner_state, params, **extra_args)
  norm = input_norm(new_inner, axis_names)
  if norm is None:
    norm = distributed.global_norm(jax.tree.leaves(updates), axis_names)
  return new_updates, new_inner, norm


def check_inner(inner) -> optax.GradientTransformationExtraArgs:
  """``inner`` with extra-argument support, after checking it is a transformation (not a factory
  such as ``optax.sgd`` itself)."""
  if not isinstance(inner, optax.GradientTransformation):
    if hasattr(inner, "gradient_transformation"):  # optax.MultiSteps
      hint = " (for optax.MultiSteps, pass its .gradient_transformation())"
    elif callable(inner):
      hint = " (a factory: call it, e.g. optax.sgd(0.1))"
    else:
      hint = ""
    raise TypeError(
      f"inner must be an optax.GradientTransformation{hint}; got {inner!r} of type "
      f"{type(inner).__name__}."
    )
  return optax.with_extra_args_support(inner)


def check_same_decision(ok: jax.Array, owner: str) -> None:
  """Raises ``ValueError`` at trace time if, inside ``shard_map``, the skip decision may differ
  between devices: one device skipping while another applies the step splits the replicas."""
  varying = distributed.varying_axes_of(ok)
  if varying:
    raise ValueError(
      f"{owner}: the decision to skip differs between devices along the mesh axes {varying}: the "
      "gradient or loss it judges is split or differs there. Pass axis_name= those axes to the "
      "guard (and to the clip inside it)."
    )


def as_scalar_loss(loss, axis_names: tuple[str, ...] = ()) -> jax.Array | None:
  """The ``loss=`` extra argument as a float32 scalar: a mean over examples and devices.

  Averaged across ``axis_names`` so that every device takes the same decision (a NaN loss on one
  device makes the mean NaN on all of them).
  """
  if loss is None:
    return None
  return distributed.mean_across(jnp.mean(jnp.asarray(loss, jnp.float32)), axis_names)

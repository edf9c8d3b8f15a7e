"""Which leaves a transform acts on: ``mask=``, as ``optax.masked`` takes it.

A mask is a pytree of Python booleans shaped like the updates (or a prefix of them), or a callable
``tree -> such a pytree``. The selected leaves form a view of the tree in which every other
subtree is an ``optax.MaskedNode`` (an empty node, so it has no leaves): a transform runs on the
view as on any tree, keeping the real paths in its group names, and the leaves it does not select
are passed through untouched. The same view is what ``optax.masked`` gives its inner transform,
so a masked clip inside ``optax.partition`` or beside ``optax.contrib.muon`` sees its leaves in
the order they would have there.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clipchain._src import tree as tree_lib
from clipchain._src.granularity import Global, measure_robustly

MaskLike = Any  # None, a pytree of bools, or a callable tree -> pytree of bools


def _check_leaves(mask_tree, where: str) -> None:
  for leaf in jax.tree.leaves(mask_tree):
    if not isinstance(leaf, (bool, np.bool_)):
      raise TypeError(
        f"mask must hold Python booleans (True: the leaf is clipped), decided from the tree's "
        f"structure, not its values; {where} holds {leaf!r} of type {type(leaf).__name__}."
      )


def validate_mask(mask: MaskLike) -> MaskLike:
  """Checks a ``mask=`` argument at construction: ``None``, a callable, or a pytree of bools."""
  if mask is None or callable(mask):
    return mask
  if isinstance(mask, (bool, np.bool_)):
    # What optax.inject_hyperparams passes when given a mask callable: it calls every callable
    # argument as a schedule of the step count, and the callable's answer for a scalar is a bool.
    raise ValueError(
      f"mask must be a pytree of booleans or a callable, not the single boolean {mask!r} (use "
      f"mask=None to clip every leaf). Around optax.inject_hyperparams, which calls a callable "
      f"argument as a schedule of the step count, name it static: "
      f"inject_hyperparams(..., static_args=('mask',))."
    )
  _check_leaves(mask, "it")
  return mask


def resolve(mask: MaskLike, tree) -> Any:
  """The pytree of bools that ``mask`` gives for ``tree``."""
  mask_tree = mask(tree) if callable(mask) else mask
  _check_leaves(mask_tree, "the pytree the mask callable returned")
  return mask_tree


def select(tree, mask_tree, keep: bool = True):
  """The view of ``tree`` with the subtrees where the mask is ``keep`` (an ``optax.MaskedNode``
  elsewhere)."""
  try:
    return jax.tree.map(
      lambda m, subtree: subtree if bool(m) == keep else optax.MaskedNode(), mask_tree, tree
    )
  except ValueError as e:
    raise ValueError(
      f"mask must be shaped like the updates, or a prefix of them: mask "
      f"{jax.tree.structure(mask_tree)}, updates {jax.tree.structure(tree)}."
    ) from e


def merge(mask_tree, selected, tree):
  """``tree`` with the selected subtrees replaced by those of ``selected`` (a view from
  :func:`select`)."""
  return jax.tree.map(lambda m, new, old: new if m else old, mask_tree, selected, tree)


def masked_transform(init_fn, update_fn, mask: MaskLike, axis_names: tuple[str, ...]):
  """The transform ``(init_fn, update_fn)`` run on the leaves ``mask`` selects, the others passed
  through; its state's ``total_norm`` field records the norm of the whole update.

  The state is that of ``init_fn`` on the selected leaves, whose ``norm`` field is their norm."""

  def init(params):
    # Unboxed, so that the mask (a callable's answer or the user's pytree) is shaped like the
    # updates it is applied to; the state holds no parameter-shaped leaf that a box would describe.
    params = tree_lib.unboxed(params)
    state = init_fn(select(params, resolve(mask, params)))
    return state._replace(total_norm=jnp.zeros((), jnp.float32))

  def update(updates, state, params=None):
    mask_tree = resolve(mask, updates)
    out, new_state = update_fn(
      select(updates, mask_tree), state, None if params is None else select(params, mask_tree)
    )
    # The leaves passed through are read once, for the whole update's norm; the selected ones
    # were read once by the transform.
    _, rest_norm = measure_robustly(Global(), select(updates, mask_tree, keep=False), axis_names)
    return merge(mask_tree, out, updates), new_state._replace(
      total_norm=_hypot(new_state.norm, rest_norm)
    )

  return optax.GradientTransformation(init, update)


def _hypot(a: jax.Array, b: jax.Array) -> jax.Array:
  """``sqrt(a² + b²)`` in float32, correctly rounded where the squares neither overflow nor
  underflow (XLA's hypot is a few ulp off there: 12.999999 for 5 and 12), and XLA's hypot where
  they do."""
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  squares = a * a + b * b
  normal = jnp.isfinite(squares) & (squares >= jnp.finfo(jnp.float32).tiny)
  return jnp.where(normal, jnp.sqrt(squares), jnp.hypot(a, b))

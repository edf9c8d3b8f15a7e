"""Statistics: one call that collects what every clipchain transform in an optimizer state measured.

Each clipchain state (declared with :func:`clipchain._src.state.state`) reports its own statistics
with ``report()``; :func:`stats` walks any optimizer state, finds them and names them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from clipchain._src import state as state_lib
from clipchain._src import tree as tree_lib


def _unwrap(x):
  return x.get_value() if tree_lib.is_nnx_variable(x) else x


def reporting_states(tree):
  """Every clipchain state in ``tree``, outer before inner (a guard before the state it wraps)."""
  for node in jax.tree.leaves(tree, is_leaf=state_lib.is_state):
    if state_lib.is_state(node):
      yield node
      for field in node._fields:
        value = getattr(node, field)
        if jax.tree.leaves(value, is_leaf=state_lib.is_state):
          yield from reporting_states(value)


def stats(opt_state: Any) -> dict[str, jax.Array]:
  """Collects the statistics of every clipchain transform in an optimizer state.

  Walks any optimizer state (``optax.chain`` tuples, ``inject_hyperparams``, ``masked``,
  ``MultiSteps`` and other wrappers, nested arbitrarily) and returns a flat dictionary. Keys are
  ``"{name}/{statistic}"``, where ``name`` is the transform's name (its ``name=`` argument, else the
  function's name); a name that occurs more than once gets ``_1``, ``_2``, ... appended in the
  order the states occur. Per-layer statistics are keyed ``"{name}/{statistic}/{layer path}"``;
  a per-group statistic of a tree with no groups (``optax.masked`` with every leaf masked out) is
  left out, so every value is a scalar (one per run under ``vmap``).

  Pure and cheap: it only reads fields, so it can be called inside ``jit`` on the state a step
  returns, without computing any norm a second time.

  Args:
    opt_state: an optimizer state, e.g. the second value returned by ``tx.update``.

  Returns:
    A ``dict`` mapping names to ``jax.Array`` values.

  Examples:
    >>> import jax.numpy as jnp, optax, clipchain
    >>> tx = optax.chain(clipchain.clip_by_global_norm(1.0), optax.sgd(0.1))
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> _, state = tx.update({"w": jnp.array([3.0, 4.0])}, state, params)
    >>> s = clipchain.stats(state)
    >>> float(s["clip_by_global_norm/norm"]), float(s["clip_by_global_norm/clipped_norm"])
    (5.0, 1.0)
  """
  found = list(reporting_states(opt_state))
  seen: dict[str, int] = {}
  used: set[str] = set()
  out: dict[str, jax.Array] = {}
  for node in found:
    # Flax NNX keeps optimizer-state arrays inside Variables (nnx.Optimizer's OptArray).
    node = jax.tree.map(_unwrap, node, is_leaf=tree_lib.is_nnx_variable)
    k = seen.get(node.name, 0)
    prefix = node.name if k == 0 else f"{node.name}_{k}"
    while prefix in used:  # another state may be named "x_1" explicitly: never overwrite it
      k += 1
      prefix = f"{node.name}_{k}"
    seen[node.name] = k + 1
    used.add(prefix)
    for key, value in node.report().items():
      if jnp.size(value) == 0:
        # A per-group statistic of no groups (every leaf masked out): nothing to log, and no
        # scalar to call float() on.
        continue
      full = f"{prefix}/{key}"
      if full in out:
        raise ValueError(
          f"two statistics are both named {full!r}; give the transforms names that are not "
          f"prefixes of one another's statistics (name=...)."
        )
      out[full] = value
  return out

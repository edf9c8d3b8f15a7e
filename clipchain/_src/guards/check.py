"""Turning a guard's exceeded limit into an error."""

from __future__ import annotations

import optax
from jax.experimental import checkify

from clipchain._src.guards.nonfinite import SkipNonFiniteState
from clipchain._src.stats import reporting_states


def check_guards(opt_state: optax.OptState) -> None:
  """Fails, through ``jax.experimental.checkify``, if a guard's ``max_consecutive`` was exceeded.

  Call it inside a step function transformed by ``checkify.checkify``; the error then travels out
  of ``jit`` as a value and ``err.throw()`` raises it on the host. Outside ``checkify``, read
  ``clipchain.stats(opt_state)["{name}/limit_exceeded"]`` instead.

  Args:
    opt_state: any optimizer state containing :func:`clipchain.skip_nonfinite` states.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, clipchain
    >>> from jax.experimental import checkify
    >>> tx = clipchain.skip_nonfinite(optax.sgd(0.1), max_consecutive=1)
    >>> params = {"w": jnp.ones(1)}
    >>> @jax.jit
    ... @checkify.checkify
    ... def step(params, state, grads):
    ...   updates, state = tx.update(grads, state, params)
    ...   clipchain.check_guards(state)
    ...   return optax.apply_updates(params, updates), state
    >>> state = tx.init(params)
    >>> bad = {"w": jnp.array([jnp.nan])}
    >>> err, (params, state) = step(params, state, bad)
    >>> err.get() is None
    True
    >>> err, (params, state) = step(params, state, bad)
    >>> print(err.get())  # doctest: +ELLIPSIS
    skip_nonfinite: more than 1 consecutive steps had a non-finite gradient or loss...
  """
  for node in reporting_states(opt_state):
    if isinstance(node, SkipNonFiniteState) and node.max_consecutive >= 0:
      checkify.check(
        ~node.limit_exceeded,
        f"{node.name}: more than {node.max_consecutive} consecutive steps had a non-finite "
        "gradient or loss",
      )

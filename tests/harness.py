"""Test harness shared by the numerical test files."""

import functools


@functools.cache
def updater(make_tx):
  """``(updates, threshold) -> (updates, state)`` for a transform factory ``make_tx(threshold)``.

  One function per factory, so that ``jax.jit`` compiles it once per tree shape with the threshold
  as a traced argument.
  """

  def update(updates, threshold):
    tx = make_tx(threshold)
    return tx.update(updates, tx.init(updates))

  return update

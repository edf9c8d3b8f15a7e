"""Test harness shared by the numerical test files."""

import contextlib
import functools
import importlib.util
import sys

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp


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


@contextlib.contextmanager
def loaded_script(path, name: str):
  """Imports a script that is not in a package (an example, a benchmark) as module ``name``."""
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  # dataclasses look their module up in sys.modules while the class is built.
  sys.modules[spec.name] = module
  try:
    spec.loader.exec_module(module)
    yield module
  finally:
    del sys.modules[spec.name]


def bits(x) -> np.ndarray:
  """The raw bits of an array: floats as unsigned integers of their width, others as they are."""
  x = np.asarray(x)
  if np.issubdtype(x.dtype, np.floating):
    return x.view(np.dtype(f"uint{8 * x.dtype.itemsize}"))
  return x


def assert_bits_equal(actual, expected):
  """Same tree structure, and every leaf the same dtype, shape and bits (signed zeros, NaNs)."""
  chex.assert_trees_all_equal_structs(actual, expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert np.asarray(a).dtype == np.asarray(e).dtype
    assert np.shape(a) == np.shape(e)
    np.testing.assert_array_equal(bits(a), bits(e))


def orbax_round_trip(directory, state, like=None):
  """Saves ``state`` with Orbax and restores it into a target shaped like ``like`` or ``state``."""
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory, state)
    checkpointer.wait_until_finished()
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state if like is None else like)
    return checkpointer.restore(directory, target)

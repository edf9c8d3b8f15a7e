"""Test harness shared by the numerical test files."""

import contextlib
import functools
import importlib.util
import sys


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

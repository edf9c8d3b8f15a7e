"""Test harness shared by the numerical test files."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

# Trees of random values, from nested dicts of shapes.


def _map_shapes(fn, shapes, path):
  """``shapes`` with each shape replaced by ``fn(path, shape)``, ``path`` written ``"a/b"``."""
  if isinstance(shapes, dict):
    return {k: _map_shapes(fn, v, f"{path}/{k}" if path else k) for k, v in shapes.items()}
  return fn(path, shapes)


def map_shapes(fn, shapes):
  """``shapes`` (nested dicts of shape tuples) with each shape replaced by ``fn(shape)``.

  Leaves are visited in the order the dicts are written, not in ``jax.tree``'s sorted order, so
  that a random ``fn`` draws the leaves in that order.
  """
  return _map_shapes(lambda _, shape: fn(shape), shapes, "")


def normal_tree(shapes, seed: int, scale: float = 1.0, batch: tuple[int, ...] = ()):
  """Float32 ``scale * N(0, 1)`` leaves shaped ``batch + shape`` for each shape in ``shapes``."""
  rng = np.random.default_rng(seed)
  return map_shapes(
    lambda shape: jnp.asarray(scale * rng.normal(size=batch + shape), jnp.float32), shapes
  )


def random_tree(shapes, seed: int, dtype=jnp.float32):
  """Normal leaves, each scaled by its own ``10**U(-1, 1)`` so that norms spread, rounded once to
  ``dtype``: one dtype, or a function from a leaf's path (``"dense/kernel"``) to its dtype."""
  rng = np.random.default_rng(seed)
  dtype_of = dtype if inspect.isfunction(dtype) else (lambda _: dtype)
  return _map_shapes(
    lambda path, shape: jnp.asarray(
      rng.normal(size=shape) * 10.0 ** rng.uniform(-1.0, 1.0), dtype_of(path)
    ),
    shapes,
    "",
  )


def norm64(tree) -> float:
  """The global norm of ``tree``, computed in float64."""
  return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree))))


# Sequences of gradients as lists of ``{"a/b": array}`` steps, and as trees stacked over steps.


def shape_of(shapes, path: str):
  """The shape at ``path`` (``"a/b"``) in ``shapes``, nested dicts of shape tuples."""
  node = shapes
  for key in path.split("/"):
    node = node[key]
  return node


def nest(flat):
  """``{"a/b": x}`` as the nested dicts ``{"a": {"b": x}}``."""
  out = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = out
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return out


def flat(tree, prefix=""):
  """Nested dicts ``{"a": {"b": x}}`` as ``{"a/b": np.asarray(x)}``."""
  out = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else key
    out.update(flat(value, path) if isinstance(value, dict) else {path: np.asarray(value)})
  return out


def as_tree(step, dtype=jnp.float32):
  """One step ``{"a/b": array}`` as a nested tree of ``dtype`` JAX arrays."""
  return nest({p: jnp.asarray(x, dtype) for p, x in step.items()})


def stacked(seq):
  """The steps of ``seq`` as one float32 tree, stacked on a leading axis."""
  return as_tree({p: np.stack([g[p] for g in seq]) for p in seq[0]})


# Running a transformation over a sequence.


def at(tree, i):
  """Step ``i`` of a tree stacked on a leading axis."""
  return jax.tree.map(lambda x: x[i], tree)


def unstack(tree):
  """The steps of a tree stacked on a leading axis, as a list of trees."""
  return [at(tree, i) for i in range(len(jax.tree.leaves(tree)[0]))]


def stack(trees, axis: int = 0):
  """Trees of one structure as one tree, their leaves stacked on a new axis ``axis``."""
  return jax.tree.map(lambda *xs: jnp.stack(xs, axis), *trees)


@functools.cache
def scanner(tx, report=None):
  """``(grads, params=None) -> (final state, (updates, reports))``: ``tx`` over ``grads`` stacked
  on a leading axis, as one jitted ``lax.scan``, from ``tx.init(params)`` or, without ``params``,
  ``tx.init`` of the first step. ``reports`` stacks ``report(state)`` (by default the state) after
  every step.

  Cached, so that jit compiles each transform once per tree shape.
  """

  @jax.jit
  def scanned(grads, params=None):
    def step(state, g):
      updates, state = tx.update(g, state, params)
      return state, (updates, state if report is None else report(state))

    return jax.lax.scan(step, tx.init(at(grads, 0) if params is None else params), grads)

  return scanned


def scan(tx, grads, report=None, params=None):
  """``(final state, updates, reports)`` of ``scanner(tx, report)`` over the stacked ``grads``."""
  final, (updates, reports) = scanner(tx, report)(grads, params)
  return final, updates, reports


def loop(update, state, grads, *args):
  """``update(g, state, *args)`` for each ``g`` of ``grads`` in turn, from ``state``; returns the
  list of updates and the list of states after each step."""
  outputs, states = [], []
  for g in grads:
    updates, state = update(g, state, *args)
    outputs.append(updates)
    states.append(state)
  return outputs, states


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


# Parametrised cases.


@dataclasses.dataclass(frozen=True)
class TransformCase:
  """A transformation under test: ``id`` names the test, ``make()`` builds the transformation."""

  id: str
  make: Callable[[], optax.GradientTransformation]


def parametrize_cases(cases):
  """``pytest.mark.parametrize`` of the argument ``case`` over ``cases``, named by their ``id``."""
  return pytest.mark.parametrize("case", cases, ids=[c.id for c in cases])


# Scripts that are not in a package.


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


def script_fixture(path, name: str):
  """A module-scoped fixture whose value is the script at ``path``, imported as module ``name``.

  pytest names the fixture after the module attribute it is assigned to.
  """

  @pytest.fixture(scope="module")
  def fixture():
    with loaded_script(path, name) as module:
      yield module

  return fixture


# Bits and checkpoints.


def bits(x) -> np.ndarray:
  """The raw bits of an array: floats as unsigned integers of their width, others as they are."""
  x = np.asarray(x)
  if np.issubdtype(x.dtype, np.floating):
    return x.view(np.dtype(f"uint{8 * x.dtype.itemsize}"))
  return x


def same_bits(a, b) -> bool:
  """Whether every leaf of ``a`` has the bits of the matching leaf of ``b``."""
  return all(
    np.array_equal(bits(x), bits(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


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


def child_jax_settings() -> dict[str, str]:
  """The compile settings of this run (tests/conftest.py) for a fresh interpreter the tests start
  with its own JAX environment: the same compilation cache and the same XLA optimisation level."""
  return {
    "XLA_FLAGS": "--xla_backend_optimization_level=0",
    "JAX_COMPILATION_CACHE_DIR": os.environ["CLIPCHAIN_TEST_JAX_CACHE"],
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
  }

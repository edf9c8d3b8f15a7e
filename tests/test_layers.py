"""Layer grouping: which leaves form one layer, what each layer is called, and how it is clipped."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from clip_reference import clip_leaves
from harness import normal_tree

import clipchain
from clipchain import granularity as gran

SHAPES = {
  "params": {
    "Dense_0": {"kernel": (3, 4), "bias": (4,)},
    "Dense_1": {"kernel": (4, 2), "bias": (2,)},
    "scale": (1,),
  }
}


def model_tree():
  """A Flax-like tree; leaves in order: params/Dense_0/{bias,kernel}, params/Dense_1/{bias,kernel},
  params/scale."""
  return normal_tree(SHAPES, 0, scale=3.0)


LEAVES = (
  "params/Dense_0/bias",
  "params/Dense_0/kernel",
  "params/Dense_1/bias",
  "params/Dense_1/kernel",
  "params/scale",
)


def clip_and_check(tx, tree, names, leaf_layer, threshold=1.0):
  """Inits ``tx`` on ``tree``, checks its layer names, and compares one update with NumPy."""
  state = tx.init(tree)
  assert state.layer_names == names
  updates, state = tx.update(tree, state)
  clipped, ref = clip_leaves(jax.tree.leaves(tree), "layer", threshold, leaf_layer)
  for actual, expected in zip(jax.tree.leaves(updates), clipped):
    np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=1e-7)
  stats = clipchain.stats(state)
  for i, layer in enumerate(names):
    np.testing.assert_allclose(
      stats[f"{state.name}/norm/{layer}"], ref["layer_norms"][i], rtol=2e-5
    )
  return state


def test_default_is_one_layer_per_leaf():
  clip_and_check(clipchain.clip_by_layer_norm(1.0), model_tree(), LEAVES, (0, 1, 2, 3, 4))


@pytest.mark.parametrize("layers", [None, "leaf"])
def test_leaf_spellings(layers):
  state = clipchain.clip_by_layer_norm(1.0, layers=layers).init(model_tree())
  assert state.layer_names == LEAVES


def test_module_groups_a_modules_leaves():
  """Kernel and bias of one module form one layer; a leaf directly under a node is its own."""
  clip_and_check(
    clipchain.clip_by_layer_norm(1.0, layers="module"),
    model_tree(),
    ("params/Dense_0", "params/Dense_1", "params"),
    (0, 0, 1, 1, 2),
  )


def test_module_with_top_level_leaves():
  tree = {"w": jnp.array([3.0, 4.0]), "sub": {"a": jnp.array([1.0]), "b": jnp.array([2.0])}}
  clip_and_check(clipchain.clip_by_layer_norm(1.0, layers="module"), tree, ("sub", "w"), (0, 0, 1))


def test_regex_mapping_first_match_wins():
  """``Dense_1/kernel`` matches both patterns; the first entry claims it."""
  layers = {"kernels": r"kernel$", "dense_1": r"Dense_1/", "rest": r".*"}
  # Layer names are ordered by their first leaf.
  clip_and_check(
    clipchain.clip_by_layer_norm(1.0, layers=layers),
    model_tree(),
    ("rest", "kernels", "dense_1"),
    (0, 1, 2, 1, 0),
  )


def test_regex_is_searched_not_matched():
  """A pattern may match anywhere in the path (``re.search``)."""
  state = clipchain.clip_by_layer_norm(1.0, layers={"bias": "bias", "other": ""}).init(model_tree())
  assert state.layer_names == ("bias", "other")


def test_callable_grouping():
  def by_rank(path, leaf):
    assert isinstance(path, str) and path in LEAVES
    return f"rank{jnp.ndim(leaf)}"

  clip_and_check(
    clipchain.clip_by_layer_norm(1.0, layers=by_rank),
    model_tree(),
    ("rank1", "rank2"),
    (0, 1, 0, 1, 0),
  )


def test_per_layer_thresholds():
  """A ``{layer: threshold}`` mapping clips each layer to its own threshold."""
  thresholds = {"params/Dense_1": 0.5, "params/Dense_0": 100.0, "params": 0.0}
  tx = clipchain.clip_by_layer_norm(thresholds, layers="module")
  tree = model_tree()
  state = tx.init(tree)
  updates, state = tx.update(tree, state)
  # In layer order: Dense_0, Dense_1, params.
  clipped, _ = clip_leaves(jax.tree.leaves(tree), "layer", [100.0, 0.5, 0.0], (0, 0, 1, 1, 2))
  for actual, expected in zip(jax.tree.leaves(updates), clipped):
    np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=1e-7)
  # Dense_0 is not clipped; Dense_1 ends at norm 0.5; the scale is zeroed.
  dense_0 = updates["params"]["Dense_0"]
  np.testing.assert_array_equal(dense_0["kernel"], tree["params"]["Dense_0"]["kernel"])
  dense_1 = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(updates["params"]["Dense_1"])))
  np.testing.assert_allclose(dense_1, 0.5, rtol=1e-5)
  np.testing.assert_array_equal(updates["params"]["scale"], 0.0)
  stats = clipchain.stats(state)
  for layer, value in thresholds.items():
    np.testing.assert_allclose(stats[f"clip_by_layer_norm/threshold/{layer}"], value)


def test_per_layer_thresholds_with_regex_layers():
  layers = {"attn": r"^attn/", "mlp": r"^mlp/"}
  tree = {"attn": {"q": jnp.array([3.0, 4.0])}, "mlp": {"w": jnp.array([3.0, 4.0])}}
  tx = clipchain.clip_by_layer_norm({"mlp": 10.0, "attn": 1.0}, layers=layers)
  updates, _ = tx.update(tree, tx.init(tree))
  np.testing.assert_allclose(updates["attn"]["q"], [0.6, 0.8], rtol=1e-6)
  np.testing.assert_array_equal(updates["mlp"]["w"], [3.0, 4.0])


def test_block_rms_groups_like_layers():
  tx = clipchain.clip_norm(0.5, granularity=gran.Layer("module", norm="rms"))
  tree = model_tree()
  updates, state = tx.update(tree, tx.init(tree))
  assert state.layer_names == ("params/Dense_0", "params/Dense_1", "params")
  clipped, _ = clip_leaves(jax.tree.leaves(tree), "rms", 0.5, (0, 0, 1, 1, 2))
  for actual, expected in zip(jax.tree.leaves(updates), clipped):
    np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=1e-7)


def test_layer_names_are_static():
  """``layer_names`` and ``name`` are in the tree structure, not leaves, and survive jit."""
  tx = clipchain.clip_by_layer_norm(1.0, layers="module", name="lay")
  tree = model_tree()
  state = tx.init(tree)
  assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(state))
  assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(state._replace(layer_names=())))
  assert jax.tree.structure(state) != jax.tree.structure(state._replace(layer_names=("x",)))
  _, jitted = jax.jit(tx.update)(tree, state)
  assert jitted.layer_names == state.layer_names and jitted.name == "lay"
  assert jax.tree.structure(jitted) == jax.tree.structure(state)
  mapped = jax.tree.map(lambda x: x, state)
  assert mapped.layer_names == state.layer_names


class Pair(NamedTuple):
  first: jax.Array
  second: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Block:
  kernel: jax.Array
  bias: jax.Array


@flax.struct.dataclass
class FlaxBlock:
  kernel: jax.Array
  bias: jax.Array


def v(*values):
  return jnp.array(values, jnp.float32)


PATH_TREES = [
  ("dict", {"b": v(1.0), "a": {"y": v(2.0), "x": v(3.0)}}, ("a/x", "a/y", "b"), ("a", "b")),
  ("list", [v(1.0), [v(2.0), v(3.0)]], ("0", "1/0", "1/1"), ("0", "1")),
  ("tuple", (v(1.0), (v(2.0), v(3.0))), ("0", "1/0", "1/1"), ("0", "1")),
  (
    "namedtuple",
    {"enc": Pair(v(1.0), v(2.0)), "dec": Pair(v(3.0), v(4.0))},
    ("dec/first", "dec/second", "enc/first", "enc/second"),
    ("dec", "enc"),
  ),
  (
    "dataclass",
    [Block(v(1.0), v(2.0)), Block(v(3.0), v(4.0))],
    ("0/kernel", "0/bias", "1/kernel", "1/bias"),
    ("0", "1"),
  ),
  (
    "flax_struct",
    {"layer": FlaxBlock(v(1.0), v(2.0))},
    ("layer/kernel", "layer/bias"),
    ("layer",),
  ),
  ("mixed", {"m": [{"w": v(1.0)}, (v(2.0),)]}, ("m/0/w", "m/1/0"), ("m/0", "m/1")),
]


@pytest.mark.parametrize(
  "tree,leaves,modules", [t[1:] for t in PATH_TREES], ids=[t[0] for t in PATH_TREES]
)
def test_path_strings(tree, leaves, modules):
  """Layer names are ``/``-joined dict keys, sequence indices and attribute names."""
  tree = jax.tree.map(lambda x: 5.0 * x, tree)
  state = clip_and_check(clipchain.clip_by_layer_norm(1.0), tree, leaves, tuple(range(len(leaves))))
  assert set(clipchain.stats(state)) >= {f"clip_by_layer_norm/norm/{p}" for p in leaves}
  module_state = clipchain.clip_by_layer_norm(1.0, layers="module").init(tree)
  assert module_state.layer_names == modules


def test_paths_under_masked_skip_unmasked_leaves():
  tree = model_tree()
  mask = jax.tree.map(lambda x: x.ndim == 2, tree)
  tx = optax.masked(clipchain.clip_by_layer_norm(1.0), mask)
  state = tx.init(tree)
  assert clipchain.stats(state).keys() >= {
    "clip_by_layer_norm/norm/params/Dense_0/kernel",
    "clip_by_layer_norm/norm/params/Dense_1/kernel",
  }
  assert state.inner_state.layer_names == ("params/Dense_0/kernel", "params/Dense_1/kernel")

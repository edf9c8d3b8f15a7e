"""``clipchain.stats``: what it reports, under which keys, found where, with which values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from clip_reference import clip_leaves
from harness import normal_tree

import clipchain

SCALAR_KEYS = ("norm", "clipped_norm", "clipped_fraction")

SHAPES = {"a": {"w": (3, 5), "b": (5,)}, "c": (4, 2)}


def make_grads(seed: int = 0, scale: float = 1.0):
  """Leaves in ``jax.tree.leaves`` order: a/b (5,), a/w (3, 5), c (4, 2)."""
  return normal_tree(SHAPES, seed, scale)


LEAF_PATHS = ("a/b", "a/w", "c")

# (default name, factory(**kwargs), reference kind, threshold, layer names or None).
TRANSFORMS = [
  ("clip", lambda **kw: clipchain.clip(0.7, clip_statistics=True, **kw), "element", 0.7, None),
  (
    "clip_by_global_norm",
    lambda **kw: clipchain.clip_by_global_norm(2.0, **kw),
    "global",
    2.0,
    None,
  ),
  (
    "clip_by_block_rms",
    lambda **kw: clipchain.clip_by_block_rms(0.8, **kw),
    "rms",
    0.8,
    LEAF_PATHS,
  ),
  (
    "clip_by_layer_norm",
    lambda **kw: clipchain.clip_by_layer_norm(2.0, **kw),
    "layer",
    2.0,
    LEAF_PATHS,
  ),
  ("clip_norm", lambda **kw: clipchain.clip_norm(1.2, granularity="unit", **kw), "unit", 1.2, None),
]
transforms = pytest.mark.parametrize(
  "make,kind,threshold,layers", [t[1:] for t in TRANSFORMS], ids=[t[0] for t in TRANSFORMS]
)


def expected_keys(name: str, layers) -> set[str]:
  keys = {f"{name}/{k}" for k in SCALAR_KEYS}
  if layers is None:
    return keys | {f"{name}/threshold"}
  return (
    keys
    | {f"{name}/norm/{layer}" for layer in layers}
    | {f"{name}/threshold/{layer}" for layer in layers}
  )


def test_value_clip_measures_its_clipped_norm_and_fraction_only_when_asked():
  """By default the value clip reports the norm and the threshold, nothing it did not measure."""
  default = clipchain.stats(one_step(clipchain.clip(0.7)))
  assert set(default) == {"clip/norm", "clip/threshold"}
  full = clipchain.stats(one_step(clipchain.clip(0.7, clip_statistics=True)))
  assert float(default["clip/norm"]) == float(full["clip/norm"]) > 0
  assert 0 < float(full["clip/clipped_fraction"]) < 1
  with pytest.raises(TypeError, match="clip_statistics must be a bool; got 1"):
    clipchain.clip(0.7, clip_statistics=1)


def one_step(tx, grads=None):
  grads = make_grads() if grads is None else grads
  params = jax.tree.map(jnp.zeros_like, grads)
  _, state = tx.update(grads, tx.init(params), params)
  return state


@pytest.mark.parametrize(
  "default_name,make,layers",
  [(t[0], t[1], t[4]) for t in TRANSFORMS],
  ids=[t[0] for t in TRANSFORMS],
)
def test_keys_and_name(default_name, make, layers):
  """Each transform reports under its function's name, or ``name=``, exactly the documented keys."""
  assert set(clipchain.stats(one_step(make()))) == expected_keys(default_name, layers)
  assert set(clipchain.stats(one_step(make(name="mine")))) == expected_keys("mine", layers)


def test_duplicate_names_are_numbered_in_order():
  tx = optax.chain(
    clipchain.clip_by_global_norm(1.0),
    clipchain.clip_by_global_norm(2.0),
    clipchain.clip_by_global_norm(3.0),
  )
  stats = clipchain.stats(one_step(tx))
  for suffix, threshold in (("", 1.0), ("_1", 2.0), ("_2", 3.0)):
    assert float(stats[f"clip_by_global_norm{suffix}/threshold"]) == threshold
  assert len(stats) == 3 * 4


def test_duplicate_names_never_overwrite_an_explicit_name():
  """Two ``x`` and one ``x_1``: all three are reported, none overwritten."""
  tx = optax.chain(
    clipchain.clip_by_global_norm(1.0, name="x"),
    clipchain.clip_by_global_norm(2.0, name="x"),
    clipchain.clip_by_global_norm(3.0, name="x_1"),
  )
  stats = clipchain.stats(one_step(tx))
  thresholds = sorted(float(v) for k, v in stats.items() if k.endswith("/threshold"))
  assert thresholds == [1.0, 2.0, 3.0]
  assert len(stats) == 3 * 4


def test_different_transforms_same_name_are_disambiguated():
  tx = optax.chain(
    clipchain.clip(5.0, clip_statistics=True, name="c"), clipchain.clip_by_layer_norm(1.0, name="c")
  )
  stats = clipchain.stats(one_step(tx))
  assert set(stats) == expected_keys("c", None) | expected_keys("c_1", LEAF_PATHS)


MASK = {"a": {"w": True, "b": False}, "c": True}
WRAPPED = {
  "chain": optax.chain(clipchain.clip_by_global_norm(1.0, name="g"), optax.adam(0.1)),
  "nested_chain": optax.chain(
    optax.chain(optax.scale_by_adam(), optax.chain(clipchain.clip_by_global_norm(1.0, name="g"))),
    optax.scale(-0.1),
  ),
  "inject_hyperparams": optax.inject_hyperparams(clipchain.clip_by_global_norm)(
    max_norm=1.0, name="g"
  ),
  "inject_in_chain": optax.chain(
    optax.inject_hyperparams(clipchain.clip_by_global_norm)(max_norm=1.0, name="g"),
    optax.sgd(0.1),
  ),
  "masked": optax.masked(clipchain.clip_by_global_norm(1.0, name="g"), MASK),
  "multi_steps": optax.MultiSteps(
    optax.chain(clipchain.clip_by_global_norm(1.0, name="g"), optax.sgd(0.1)), every_k_schedule=1
  ),
  "multi_transform": optax.partition(
    {
      "clipped": optax.chain(clipchain.clip_by_global_norm(1.0, name="g"), optax.sgd(0.1)),
      "plain": optax.sgd(0.1),
    },
    {"a": {"w": "clipped", "b": "plain"}, "c": "clipped"},
  ),
}


@pytest.mark.parametrize("wrapper", list(WRAPPED))
def test_found_through_wrappers(wrapper):
  """Clipchain states are found inside optax's wrappers and nested chains."""
  stats = clipchain.stats(one_step(WRAPPED[wrapper]))
  assert set(stats) == expected_keys("g", None)
  assert float(stats["g/norm"]) > 1.0
  np.testing.assert_allclose(stats["g/threshold"], 1.0)


def test_several_states_in_one_wrapped_optimizer():
  tx = optax.chain(
    optax.inject_hyperparams(clipchain.clip, static_args=("clip_statistics",))(
      max_delta=10.0, clip_statistics=True
    ),
    optax.masked(clipchain.clip_by_layer_norm(1.0, name="layers"), {"a": True, "c": False}),
    optax.scale_by_adam(),
    clipchain.clip_by_global_norm(1.0),
  )
  stats = clipchain.stats(one_step(tx))
  assert set(stats) == (
    expected_keys("clip", None)
    | expected_keys("layers", ("a/b", "a/w"))
    | expected_keys("clip_by_global_norm", None)
  )


def test_inside_jit():
  """A jitted step can return the statistics dictionary."""
  tx = optax.chain(clipchain.clip_by_layer_norm(1.0), clipchain.clip_by_global_norm(2.0))
  grads = make_grads()

  @jax.jit
  def step(state, grads):
    _, state = tx.update(grads, state)
    return state, clipchain.stats(state)

  state, stats = step(tx.init(grads), grads)
  assert stats.keys() == clipchain.stats(state).keys()
  for key, value in clipchain.stats(state).items():
    assert isinstance(stats[key], jax.Array)
    np.testing.assert_array_equal(stats[key], value)
  _, ref = clip_leaves(jax.tree.leaves(grads), "layer", 1.0)
  np.testing.assert_allclose(stats["clip_by_layer_norm/norm"], ref["norm"], rtol=1e-5)


@transforms
def test_values_match_numpy(make, kind, threshold, layers):
  """Norm, post-clip norm, clipped fraction and per-layer norms, against NumPy, for two steps."""
  tx = make()
  grads0 = make_grads(1)
  state = tx.init(grads0)
  for step in range(2):
    grads = make_grads(step + 1, scale=1.0 + 0.3 * step)
    _, state = tx.update(grads, state)
    stats = clipchain.stats(state)
    name = state.name
    _, ref = clip_leaves(jax.tree.leaves(grads), kind, threshold)
    assert 0.0 < ref["clipped_fraction"] < 1.0 or kind == "global"
    np.testing.assert_allclose(stats[f"{name}/norm"], ref["norm"], rtol=1e-5)
    np.testing.assert_allclose(stats[f"{name}/clipped_norm"], ref["clipped_norm"], rtol=1e-5)
    np.testing.assert_allclose(
      stats[f"{name}/clipped_fraction"], ref["clipped_fraction"], rtol=1e-6
    )
    if layers is None:
      np.testing.assert_allclose(stats[f"{name}/threshold"], threshold, rtol=1e-6)
    else:
      for i, layer in enumerate(layers):
        np.testing.assert_allclose(stats[f"{name}/norm/{layer}"], ref["layer_norms"][i], rtol=1e-5)
        np.testing.assert_allclose(stats[f"{name}/threshold/{layer}"], threshold, rtol=1e-6)


@pytest.mark.parametrize(
  "granularity,threshold,expected",
  [
    # Global: norm 13 > 10, one group: fraction 1.
    ("global", 10.0, 1.0),
    ("global", 13.5, 0.0),
    # Layers: |u| = 5, |v| = 12; only v exceeds 6.
    ("layer", 6.0, 0.5),
    # Elements: 3, 4, 12 and three zeros: 4 and 12 exceed 3.5.
    ("element", 3.5, 2 / 6),
  ],
)
def test_clipped_fraction_counts_groups(granularity, threshold, expected):
  """The fraction of groups (the tree, layers, values) scaled down."""
  grads = {"u": jnp.array([3.0, 4.0, 0.0]), "v": jnp.array([0.0, 12.0, 0.0])}
  tx = clipchain.clip_norm(threshold, granularity=granularity, name="x")
  _, state = tx.update(grads, tx.init(grads))
  assert float(clipchain.stats(state)["x/clipped_fraction"]) == pytest.approx(expected)


def test_unit_clipped_fraction_counts_units():
  """A (2, 3) kernel has 3 units (columns); a (3,) bias is one unit."""
  kernel = jnp.array([[3.0, 0.0, 1.0], [4.0, 0.5, 0.0]])  # column norms 5, 0.5, 1
  bias = jnp.array([0.1, 0.2, 0.2])  # norm 0.3
  tx = clipchain.clip_norm(2.0, granularity="unit", name="u")
  grads = {"kernel": kernel, "bias": bias}
  _, state = tx.update(grads, tx.init(grads))
  assert float(clipchain.stats(state)["u/clipped_fraction"]) == pytest.approx(1 / 4)


@transforms
def test_zero_before_first_update(make, kind, threshold, layers):
  stats = clipchain.stats(make().init(make_grads()))
  assert stats
  for key, value in stats.items():
    np.testing.assert_array_equal(value, 0.0, err_msg=key)


def test_optax_tree_get_finds_fields():
  tx = optax.chain(optax.scale_by_adam(), clipchain.clip_by_global_norm(0.5), optax.scale(-1.0))
  state = one_step(tx)
  np.testing.assert_allclose(optax.tree.get(state, "clipped_norm"), 0.5, rtol=1e-6)
  assert float(optax.tree.get(state, "norm")) > 0.5
  np.testing.assert_array_equal(optax.tree.get(state, "clipped_fraction"), 1.0)


@transforms
def test_float32_and_fixed_shapes(make, kind, threshold, layers):
  """Statistics are float32 and keep their shapes across updates, even for bf16 updates."""
  tx = make()
  grads = jax.tree.map(lambda x: x.astype(jnp.bfloat16), make_grads(3, scale=4.0))
  state0 = tx.init(grads)
  _, state1 = tx.update(grads, state0)
  before, after = clipchain.stats(state0), clipchain.stats(state1)
  assert before.keys() == after.keys()
  for key in after:
    assert after[key].dtype == jnp.float32, key
    assert after[key].shape == before[key].shape == (), key
  assert jax.tree.structure(state0) == jax.tree.structure(state1)
  for a, b in zip(jax.tree.leaves(state0), jax.tree.leaves(state1)):
    assert a.shape == b.shape and a.dtype == b.dtype


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("granularity", ["global", "layer", "unit", "element"])
def test_nonfinite_gradient_is_reported_not_hidden(granularity, bad):
  """A NaN or Inf value makes the reported norm non-finite (never 0) and never passes unclipped."""
  grads = {"a": jnp.array([bad, 1.0]), "b": jnp.array([[3.0, 4.0]])}
  tx = clipchain.clip_norm(1.0, granularity=granularity)
  updates, state = tx.update(grads, tx.init(grads))
  norm = float(clipchain.stats(state)["clip_norm/norm"])
  assert np.isnan(norm) if np.isnan(bad) else norm == np.inf
  first = np.asarray(updates["a"])[0]
  if granularity == "element" and np.isinf(bad):
    # Per value, +-Inf is clipped to +-c, as optax.clip and torch's clip_grad_value_ do.
    assert first == np.sign(bad) * 1.0
  else:
    # A norm-based clip never turns the bad value into a finite number.
    assert not np.isfinite(first)

"""Every granularity of ``clip_norm`` against an independent float64 NumPy model.

The model labels every value of the tree with the group its norm is measured over (one group for
``global``, one per layer, per output unit or per value) and then clips by definition: a group
whose norm ``n`` exceeds the threshold ``c`` is multiplied by ``c / n``. Only the labelling differs
between granularities, so the arithmetic under test is never borrowed from clipchain.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from harness import random_tree, updater

import clipchain
from clipchain.granularity import Layer, Unit

RTOL = 1e-5
ATOL = 1e-6

# Every rank the flax layout defines units for, and a kernel whose squeezed rank is 1.
MIXED_SHAPES = {
  "r0": (),
  "r1": (7,),
  "r2": (4, 3),
  "r3": (2, 4, 3),
  "r4": (3, 3, 2, 4),
  "r5": (2, 2, 2, 3, 4),
  "squeezed": (1, 6),
}
# The same ranks behind one leading axis of stacked (scanned) layers.
STACKED_SHAPES = {
  "s1": (3,),
  "s2": (3, 5),
  "s3": (2, 4, 3),
  "s4": (2, 2, 4, 3),
  "s5": (2, 3, 3, 2, 4),
  "s6": (2, 2, 2, 2, 3, 4),
  "squeezed": (3, 1, 6),
}
# A Flax-like parameter tree: modules whose leaves form one layer with layers="module".
MODULE_SHAPES = {
  "Conv_0": {"kernel": (3, 3, 2, 4), "bias": (4,)},
  "Dense_0": {"kernel": (4, 3), "bias": (3,)},
  "LayerNorm_0": {"scale": (5,), "bias": (5,)},
  "temperature": (),
}


def flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
  """``{"a": {"b": x}}`` as ``{"a/b": float64 x}``, independently of ``jax.tree``."""
  out = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else key
    if isinstance(value, dict):
      out.update(flatten(value, path))
    else:
      out[path] = np.asarray(value, np.float64)
  return out


# Group labels: for each leaf path, an int array of the leaf's shape naming the group of each value.


def offset(labels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Makes per-leaf labels unique across leaves."""
  out, start = {}, 0
  for path, lab in labels.items():
    out[path] = lab + start
    start += int(lab.max()) + 1
  return out


def global_labels(flat):
  return {p: np.zeros(x.shape, np.int64) for p, x in flat.items()}


def layer_labels(flat, layer_of):
  names = sorted({layer_of(p) for p in flat})
  return {p: np.full(x.shape, names.index(layer_of(p)), np.int64) for p, x in flat.items()}, names


def element_labels(flat):
  return offset({p: np.arange(x.size).reshape(x.shape) for p, x in flat.items()})


def unit_reduce_axes(shape, layout: str):
  """The axes one output unit spans (optax.adaptive_grad_clip's rule, or PyTorch's (out, in))."""
  if layout == "torch":
    return tuple(range(len(shape))) if len(shape) <= 1 else tuple(range(1, len(shape)))
  if sum(d != 1 for d in shape) <= 1:
    return tuple(range(len(shape)))
  return {2: (0,), 3: (0,), 4: (0, 1, 2), 5: (0, 1, 2, 3)}[len(shape)]


def leaf_unit_labels(shape, layout: str, stacked: int):
  if stacked:
    inner = leaf_unit_labels(shape[1:], layout, stacked - 1)
    per_slice = int(inner.max()) + 1
    return np.stack([inner + i * per_slice for i in range(shape[0])])
  reduced = unit_reduce_axes(shape, layout)
  kept = [a for a in range(len(shape)) if a not in reduced]
  if not kept:
    return np.zeros(shape, np.int64)
  index = np.indices(shape)
  return np.ravel_multi_index(tuple(index[a] for a in kept), tuple(shape[a] for a in kept))


def unit_labels(flat, layout="flax", stacked=0):
  return offset({p: leaf_unit_labels(x.shape, layout, stacked) for p, x in flat.items()})


def group_norms(flat, labels, rms=False) -> np.ndarray:
  n = 1 + max(int(lab.max()) for lab in labels.values())
  squares, counts = np.zeros(n), np.zeros(n)
  for p, x in flat.items():
    squares += np.bincount(labels[p].ravel(), weights=(x * x).ravel(), minlength=n)
    counts += np.bincount(labels[p].ravel(), minlength=n)
  return np.sqrt(squares / counts) if rms else np.sqrt(squares)


def reference_clip(flat, labels, thresholds, rms=False):
  """The float64 model: clipped leaves and the statistics clipchain should report."""
  norms = group_norms(flat, labels, rms)
  thresholds = np.broadcast_to(np.asarray(thresholds, np.float64), norms.shape)
  over = norms > thresholds
  factor = np.where(over, thresholds / np.where(over, norms, 1.0), 1.0)
  clipped = {p: x * factor[labels[p]] for p, x in flat.items()}
  stats = {
    "norm": np.sqrt(sum(np.sum(x * x) for x in flat.values())),
    "clipped_norm": np.sqrt(sum(np.sum(x * x) for x in clipped.values())),
    "clipped_fraction": np.mean(over),
    "group_norms": norms,
  }
  return clipped, stats


def choose_threshold(norms: np.ndarray, mode: str) -> float:
  """Below every group norm, above every one, or in the widest gap between two of them."""
  s = np.unique(norms[norms > 0])
  if mode == "below":
    return float(0.5 * s[0])
  if mode == "above":
    return float(2.0 * s[-1])
  if len(s) == 1:
    return float(0.5 * s[0])
  j = int(np.argmax(s[1:] / s[:-1]))
  assert s[j + 1] / s[j] > 1.001, "no clear gap between group norms"
  return float(np.sqrt(s[j] * s[j + 1]))


def assert_leaves_close(out, expected: dict[str, np.ndarray]):
  got = flatten(jax.tree.map(np.asarray, out))
  assert got.keys() == expected.keys()
  for path, want in expected.items():
    np.testing.assert_allclose(got[path], want, rtol=RTOL, atol=ATOL, err_msg=path)


def assert_scalar_stats(state, ref, threshold):
  assert int(state.count) == 1
  np.testing.assert_allclose(float(state.norm), ref["norm"], rtol=RTOL)
  np.testing.assert_allclose(float(state.clipped_norm), ref["clipped_norm"], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(float(state.clipped_fraction), ref["clipped_fraction"], rtol=1e-6)
  assert state.threshold.shape == ()
  np.testing.assert_allclose(float(state.threshold), threshold, rtol=1e-6)
  assert np.size(state.layer_norms) == 0  # no layers: nothing per layer


def run(make_tx, threshold, tree, maybe_jit):
  return maybe_jit(updater(make_tx))(jax.tree.map(jnp.asarray, tree), threshold)


# Granularities reporting one scalar threshold: (transform factory, shapes, group labels).
SCALAR_CASES = {
  "global": (lambda c: clipchain.clip_norm(c), MIXED_SHAPES, global_labels),
  "unit_flax": (lambda c: clipchain.clip_norm(c, granularity="unit"), MIXED_SHAPES, unit_labels),
  "unit_torch": (
    lambda c: clipchain.clip_norm(c, granularity=Unit(layout="torch")),
    MIXED_SHAPES,
    lambda flat: unit_labels(flat, layout="torch"),
  ),
  "unit_stacked": (
    lambda c: clipchain.clip_norm(c, granularity=Unit(stacked_axes=1)),
    STACKED_SHAPES,
    lambda flat: unit_labels(flat, stacked=1),
  ),
  "element": (
    lambda c: clipchain.clip_norm(c, granularity="element"),
    MIXED_SHAPES,
    element_labels,
  ),
}


@pytest.mark.parametrize("mode", ["below", "between", "above"])
@pytest.mark.parametrize("case", list(SCALAR_CASES))
def test_scalar_threshold_granularities(case, mode, maybe_jit):
  make_tx, shapes, make_labels = SCALAR_CASES[case]
  tree = random_tree(shapes, seed=sorted(SCALAR_CASES).index(case))
  flat = flatten(tree)
  labels = make_labels(flat)
  threshold = choose_threshold(group_norms(flat, labels), mode)
  expected, ref = reference_clip(flat, labels, threshold)
  if mode == "between" and case != "global":  # the global granularity has a single group
    assert 0 < ref["clipped_fraction"] < 1
  out, state = run(make_tx, threshold, tree, maybe_jit)
  assert_leaves_close(out, expected)
  assert_scalar_stats(state, ref, threshold)
  if mode == "above":
    unchanged = jax.tree.map(np.array_equal, jax.tree.map(np.asarray, out), tree)
    assert all(jax.tree.leaves(unchanged)), "below the threshold the update must be unchanged"


def module_of(path: str) -> str:
  return path.rsplit("/", 1)[0]


# Granularities with one threshold per layer: (transform factory, shapes, layer of a path, rms).
LAYER_CASES = {
  "layer": (lambda c: clipchain.clip_norm(c, granularity="layer"), MIXED_SHAPES, str, False),
  "module": (
    lambda c: clipchain.clip_by_layer_norm(c, layers="module"),
    MODULE_SHAPES,
    module_of,
    False,
  ),
  "block_rms": (clipchain.clip_by_block_rms, MIXED_SHAPES, str, True),
  "module_rms": (
    lambda c: clipchain.clip_norm(c, granularity=Layer("module", norm="rms")),
    MODULE_SHAPES,
    module_of,
    True,
  ),
}


def assert_layer_stats(state, ref, names, thresholds):
  assert int(state.count) == 1
  assert set(state.layer_names) == set(names)
  np.testing.assert_allclose(float(state.norm), ref["norm"], rtol=RTOL)
  np.testing.assert_allclose(float(state.clipped_norm), ref["clipped_norm"], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(float(state.clipped_fraction), ref["clipped_fraction"], rtol=1e-6)
  order = [names.index(n) for n in state.layer_names]
  assert state.layer_norms.shape == state.threshold.shape == (len(names),)
  np.testing.assert_allclose(np.asarray(state.layer_norms), ref["group_norms"][order], rtol=RTOL)
  np.testing.assert_allclose(np.asarray(state.threshold), thresholds[order], rtol=1e-6)


@pytest.mark.parametrize("mode", ["below", "between", "above"])
@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_layer_granularities(case, mode, maybe_jit):
  make_tx, shapes, layer_of, rms = LAYER_CASES[case]
  tree = random_tree(shapes, seed=10 + sorted(LAYER_CASES).index(case))
  flat = flatten(tree)
  labels, names = layer_labels(flat, layer_of)
  threshold = choose_threshold(group_norms(flat, labels, rms), mode)
  expected, ref = reference_clip(flat, labels, threshold, rms)
  if mode == "between":
    assert 0 < ref["clipped_fraction"] < 1
  out, state = run(make_tx, threshold, tree, maybe_jit)
  assert_leaves_close(out, expected)
  assert_layer_stats(state, ref, names, np.full(len(names), threshold))


def module_l2_tx(c):
  return clipchain.clip_by_layer_norm(c, layers="module")


def module_rms_tx(c):
  return clipchain.clip_norm(c, granularity=Layer("module", norm="rms"))


@pytest.mark.parametrize("rms", [False, True], ids=["l2", "rms"])
def test_per_layer_thresholds_from_a_mapping(rms, maybe_jit):
  tree = random_tree(MODULE_SHAPES, seed=20)
  flat = flatten(tree)
  labels, names = layer_labels(flat, module_of)
  norms = group_norms(flat, labels, rms)
  # Alternate layers are clipped to half their norm and left alone (twice their norm).
  thresholds = np.array([n * (0.5 if i % 2 == 0 else 2.0) for i, n in enumerate(norms)])
  mapping = {name: float(t) for name, t in zip(names, thresholds)}
  expected, ref = reference_clip(flat, labels, thresholds, rms)
  assert ref["clipped_fraction"] == 0.5
  make_tx = module_rms_tx if rms else module_l2_tx
  out, state = run(make_tx, mapping, tree, maybe_jit)
  assert_leaves_close(out, expected)
  assert_layer_stats(state, ref, names, thresholds)


# Edge cases, at each granularity through the core.
GRANULARITIES = {
  "global": "global",
  "layer": "layer",
  "rms": Layer(norm="rms"),
  "unit": "unit",
  "element": "element",
}
EDGE_TX = {
  name: functools.partial(clipchain.clip_norm, granularity=g) for name, g in GRANULARITIES.items()
}
SMALL_SHAPES = {"kernel": (4, 3), "bias": (3,), "scale": ()}


@pytest.mark.parametrize("threshold", [0.0, 1.0])
@pytest.mark.parametrize("name", list(GRANULARITIES))
def test_zero_gradients(name, threshold, maybe_jit):
  tree = jax.tree.map(np.zeros_like, random_tree(SMALL_SHAPES, seed=0))
  out, state = run(EDGE_TX[name], threshold, tree, maybe_jit)
  for x in jax.tree.leaves(out):
    assert x.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(x), 0.0)
  for stat in (state.norm, state.clipped_norm, state.clipped_fraction, state.layer_norms):
    np.testing.assert_array_equal(np.asarray(stat), 0.0)


@pytest.mark.parametrize("name", list(GRANULARITIES))
def test_zero_threshold_zeroes_out(name, maybe_jit):
  tree = random_tree(SMALL_SHAPES, seed=1)
  out, state = run(EDGE_TX[name], 0.0, tree, maybe_jit)
  for x in jax.tree.leaves(out):
    np.testing.assert_array_equal(np.asarray(x), 0.0)  # finite, and exactly zero
  assert float(state.clipped_norm) == 0.0
  assert float(state.clipped_fraction) == 1.0
  assert np.isfinite(float(state.norm)) and float(state.norm) > 0
  np.testing.assert_array_equal(np.asarray(state.threshold), 0.0)


# Trees whose every group norm is exactly representable and equal to the threshold 5.
AT_THRESHOLD = {
  "global": {"a": [3.0, 0.0], "b": [[4.0]]},
  "layer": {"a": [3.0, -4.0], "b": [[0.0, 5.0]], "c": 5.0},
  "rms": {"a": [5.0, -5.0, 5.0, -5.0], "b": [[5.0]]},
  "unit": {"kernel": [[3.0, 0.0], [4.0, -5.0]], "bias": [-3.0, 4.0]},
  "element": {"a": [5.0, -5.0], "b": [[-5.0, 5.0]]},
}


@pytest.mark.parametrize("name", list(GRANULARITIES))
def test_norm_equal_to_threshold_is_identity(name, maybe_jit):
  tree = jax.tree.map(lambda x: np.asarray(x, np.float32), AT_THRESHOLD[name])
  out, state = run(EDGE_TX[name], 5.0, tree, maybe_jit)
  for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(tree)):
    np.testing.assert_array_equal(np.asarray(got), want)
  assert float(state.clipped_fraction) == 0.0
  assert float(state.clipped_norm) == float(state.norm)


LOSS_WEIGHTS = random_tree(SMALL_SHAPES, seed=3)


@functools.cache
def grad_of_loss(name):
  """The gradient, with respect to the updates and the threshold, of a weighted sum of the clipped
  updates."""

  def loss(updates, threshold):
    out, _ = updater(EDGE_TX[name])(updates, threshold)
    products = [jnp.sum(o * w) for o, w in zip(jax.tree.leaves(out), jax.tree.leaves(LOSS_WEIGHTS))]
    return sum(products)

  return jax.grad(loss, argnums=(0, 1))


@pytest.mark.parametrize(
  ("grads_zero", "threshold"),
  [(True, 1.0), (True, 0.0), (False, 0.0), (False, 1e-3)],
  ids=["g0", "g0-c0", "c0", "small-c"],
)
@pytest.mark.parametrize("name", list(GRANULARITIES))
def test_grad_through_the_clip_is_finite(name, grads_zero, threshold, maybe_jit):
  tree = random_tree(SMALL_SHAPES, seed=2)
  if grads_zero:
    tree = jax.tree.map(np.zeros_like, tree)
  updates = jax.tree.map(jnp.asarray, tree)
  d_updates, d_threshold = maybe_jit(grad_of_loss(name))(updates, threshold)
  for d in [*jax.tree.leaves(d_updates), d_threshold]:
    assert np.all(np.isfinite(np.asarray(d)))
  if grads_zero and threshold > 0:
    # Nothing is clipped: locally the identity.
    assert_leaves_close(d_updates, flatten(LOSS_WEIGHTS))
    assert float(d_threshold) == 0.0
  elif not grads_zero:
    # Every group is clipped: the output is c * g / n(g) (or clip(g, -c, c)), so its gradient
    # with respect to c is sum over groups of <w, g> / n(g), and at c = 0 the one in g is zero.
    flat, flat_w = flatten(tree), flatten(LOSS_WEIGHTS)
    labels = {
      "global": global_labels,
      "layer": lambda f: layer_labels(f, str)[0],
      "rms": lambda f: layer_labels(f, str)[0],
      "unit": unit_labels,
      "element": element_labels,
    }[name](flat)
    norms = group_norms(flat, labels, rms=name == "rms")
    assert np.all(norms > threshold)
    dots = sum(
      np.bincount(labels[p].ravel(), weights=(flat[p] * flat_w[p]).ravel(), minlength=norms.size)
      for p in flat
    )
    if not (name == "element" and threshold == 0.0):
      # At c = 0, jnp.clip(g, -c, c) sits on a tie (-0 against 0) where JAX splits the gradient
      # with respect to c in two for negative g: only finiteness is checked there.
      np.testing.assert_allclose(float(d_threshold), np.sum(dots / norms), rtol=1e-4)
    if threshold == 0.0:
      for d in jax.tree.leaves(d_updates):
        np.testing.assert_array_equal(np.asarray(d), 0.0)

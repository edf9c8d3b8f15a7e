"""Bad arguments fail early, naming the argument and the value: ``TypeError`` for a value of the
wrong type, ``ValueError`` for a value of the right type that is out of range."""

from __future__ import annotations

import math
import re

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipchain
from clipchain import granularity as gran

PRESETS = [
  (clipchain.clip, "max_delta"),
  (clipchain.clip_by_global_norm, "max_norm"),
  (clipchain.clip_by_block_rms, "threshold"),
  (clipchain.clip_by_layer_norm, "max_norm"),
  (clipchain.clip_norm, "threshold"),
]
presets = pytest.mark.parametrize("factory,argname", PRESETS, ids=[f.__name__ for f, _ in PRESETS])

BAD_THRESHOLDS = [
  (-1.0, "-1.0"),
  (-1e-8, "-1e-08"),
  (float("nan"), "nan"),
  (float("inf"), "inf"),
  (-float("inf"), "-inf"),
  (np.float32(-2.0), "-2.0"),
  (jnp.array(-3.0), "-3."),
  (jnp.array(jnp.nan), "nan"),
  # Finite as a Python float, infinite in the float32 the threshold is kept in.
  (3e39, "3e+39"),
  # A threshold is one number: an array would be broadcast against the updates.
  (jnp.array([1.0, 2.0]), "shape (2,)"),
  (np.ones((1,)), "shape (1,)"),
]
WRONG_TYPE_THRESHOLDS = [
  ("1.0", "'1.0'"),
  ("1.0x", "'1.0x'"),
  (True, "True"),
  (np.bool_(False), "False"),
  (None, "None"),
  (jnp.array(1.0 + 0j), "complex64"),
  ([1.0], r"\[1.0\]"),
]


@presets
@pytest.mark.parametrize("value,shown", BAD_THRESHOLDS, ids=[s for _, s in BAD_THRESHOLDS])
def test_bad_threshold(factory, argname, value, shown):
  with pytest.raises(ValueError, match=rf"{argname}.*{re.escape(shown)}"):
    factory(value)


@presets
@pytest.mark.parametrize(
  "value,shown", WRONG_TYPE_THRESHOLDS, ids=[s for _, s in WRONG_TYPE_THRESHOLDS]
)
def test_threshold_of_the_wrong_type(factory, argname, value, shown):
  with pytest.raises(TypeError, match=rf"{argname}.*{shown}"):
    factory(value)


@presets
def test_zero_threshold_is_accepted(factory, argname):
  """A zero threshold is legal and zeroes the update, finitely."""
  tx = factory(0.0)
  grads = {"w": jnp.array([3.0, -4.0]), "b": jnp.array([0.0])}
  updates, _ = tx.update(grads, tx.init(grads))
  for leaf in (updates["w"], updates["b"]):
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))


@presets
def test_schedule_is_accepted(factory, argname):
  """A schedule gives the same result as the constant it returns."""
  grads = {"w": jnp.array([3.0, -4.0])}
  scheduled, fixed = factory(optax.constant_schedule(1.0)), factory(1.0)
  updates, _ = scheduled.update(grads, scheduled.init(grads))
  expected, _ = fixed.update(grads, fixed.init(grads))
  np.testing.assert_array_equal(updates["w"], expected["w"])
  assert not np.array_equal(updates["w"], grads["w"])


@pytest.mark.parametrize("bad", ["Global", "layers", "per-layer", "", "unit "], ids=repr)
def test_unknown_granularity(bad):
  with pytest.raises(ValueError, match=rf"granularity.*{re.escape(repr(bad))}"):
    clipchain.clip_norm(1.0, granularity=bad)


@pytest.mark.parametrize("bad", [None, 3, gran.Layer], ids=repr)
def test_granularity_of_the_wrong_type(bad):
  with pytest.raises(TypeError, match=rf"granularity.*{re.escape(repr(bad))}"):
    clipchain.clip_norm(1.0, granularity=bad)


MALFORMED_LAYERS = [
  ("modules", r"layers.*'modules'", ValueError),
  ("leaves", r"layers.*'leaves'", ValueError),
  ({}, r"layers must not be an empty mapping", ValueError),
  ({"a": "("}, r"layers\['a'\].*regular expression.*'\('", ValueError),
  ({"a": "[z-a]"}, r"layers\['a'\].*'\[z-a\]'", ValueError),
  ({"a": 1}, r"layers.*'a': 1", TypeError),
  ({1: "x"}, r"layers.*1: 'x'", TypeError),
  (["dense", "out"], r"layers.*\['dense', 'out'\]", TypeError),
  (3, r"layers.*got 3", TypeError),
]


@pytest.mark.parametrize(
  "layers,message,error", MALFORMED_LAYERS, ids=[repr(m[0]) for m in MALFORMED_LAYERS]
)
def test_malformed_layers(layers, message, error):
  with pytest.raises(error, match=message):
    clipchain.clip_by_layer_norm(1.0, layers=layers)
  with pytest.raises(error, match=message):
    gran.Layer(layers)


def test_layers_callable_must_return_str():
  tx = clipchain.clip_by_layer_norm(1.0, layers=lambda path, leaf: len(path))
  with pytest.raises(TypeError, match=r"layers callable.*str.*1.*'a'"):
    tx.init({"a": jnp.zeros(2)})


def test_bad_layer_norm():
  with pytest.raises(ValueError, match=r"norm.*'l1'"):
    gran.Layer(norm="l1")
  with pytest.raises(TypeError, match=r"norm.*2"):
    gran.Layer(norm=2)


@pytest.mark.parametrize("granularity", ["global", "unit", "element", gran.Unit(layout="torch")])
def test_per_layer_thresholds_need_layer_granularity(granularity):
  shown = {"global": "Global()", "unit": "Unit(", "element": "Element("}.get(granularity, "Unit(")
  with pytest.raises(ValueError, match=rf"threshold.*mapping.*named groups.*{re.escape(shown)}"):
    clipchain.clip_norm({"a": 1.0}, granularity=granularity)


def test_per_layer_thresholds_through_presets():
  with pytest.raises(ValueError, match=r"max_delta.*mapping.*Element\("):
    clipchain.clip({"a": 1.0})
  with pytest.raises(ValueError, match=r"max_norm.*mapping.*Global\(\)"):
    clipchain.clip_by_global_norm({"a": 1.0})


@pytest.mark.parametrize(
  "value,shown", [(-1.0, "-1.0"), (float("nan"), "nan"), (float("inf"), "inf")]
)
def test_bad_per_layer_threshold_value(value, shown):
  with pytest.raises(ValueError, match=rf"max_norm\['b'\].*{shown}"):
    clipchain.clip_by_layer_norm({"a": 1.0, "b": value})


def test_empty_per_layer_mapping():
  with pytest.raises(ValueError, match=r"max_norm.*empty mapping"):
    clipchain.clip_by_layer_norm({})


def test_per_layer_keys_must_match_layers_at_init():
  params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
  tx = clipchain.clip_by_layer_norm({"a": 1.0, "zzz": 2.0})
  with pytest.raises(ValueError, match=r"max_norm.*without one: \['b'\].*not layers: \['zzz'\]"):
    tx.init(params)
  # Naming every layer is accepted.
  clipchain.clip_by_layer_norm({"a": 1.0, "b": 2.0}).init(params)


def test_leaf_matching_no_pattern_fails_at_init():
  params = {"attn": {"q": jnp.zeros(2)}, "mlp": {"w": jnp.zeros(2)}}
  tx = clipchain.clip_by_layer_norm(1.0, layers={"attn": "^attn/"})
  with pytest.raises(ValueError, match=r"leaf 'mlp/w' matches none of the layers patterns"):
    tx.init(params)


BAD_UNITS = [
  ({"layout": "jax"}, r"layout.*'jax'", ValueError),
  ({"layout": None}, r"layout.*None", TypeError),
  ({"stacked_axes": -1}, r"stacked_axes.*-1", ValueError),
  ({"stacked_axes": 1.5}, r"stacked_axes.*1\.5", TypeError),
  ({"stacked_axes": True}, r"stacked_axes.*True", TypeError),
  ({"axis": "0"}, r"axis.*'0'", TypeError),
  ({"axis": (0, 1.0)}, r"axis.*1\.0", TypeError),
  ({"axis": True}, r"axis.*True", TypeError),
]


@pytest.mark.parametrize("kwargs,message,error", BAD_UNITS, ids=[repr(k) for k, _, _ in BAD_UNITS])
def test_bad_unit_arguments(kwargs, message, error):
  with pytest.raises(error, match=message):
    gran.Unit(**kwargs)


@pytest.mark.parametrize("axis", [2, -3, (0, 5)])
def test_unit_axis_out_of_range_fails_at_init(axis):
  """An axis beyond a leaf's rank is an error, not wrapped around to another axis."""
  tx = clipchain.adaptive_grad_clip(0.1, axis=axis)
  with pytest.raises(ValueError, match=r"axis=.*out of range for leaf 'w' of shape \(3, 4\)"):
    tx.init({"w": jnp.zeros((3, 4))})
  # Negative axes within the rank count from the end, as in NumPy.
  params = {"w": jnp.ones((3, 4))}
  tx = clipchain.adaptive_grad_clip(0.1, axis=-2)
  updates, _ = tx.update(params, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], 0.1 * np.ones((3, 4)), rtol=1e-6)


def test_rank6_leaf_with_flax_layout_fails_at_init():
  tx = clipchain.clip_norm(1.0, granularity="unit")
  params = {"conv": {"kernel": jnp.zeros((2,) * 6)}}
  with pytest.raises(ValueError, match=r"'conv/kernel'.*\(2, 2, 2, 2, 2, 2\).*axis="):
    tx.init(params)
  # The same leaf is fine when the axes are given.
  clipchain.clip_norm(1.0, granularity=gran.Unit(axis=(0, 1, 2, 3, 4))).init(params)


def test_stacked_axes_beyond_rank_fails_at_init():
  tx = clipchain.clip_norm(1.0, granularity=gran.Unit(stacked_axes=2))
  with pytest.raises(ValueError, match=r"'w'.*stacked_axes=2"):
    tx.init({"w": jnp.zeros(3)})


@pytest.mark.parametrize("name", ["", 3, ("clip",), b"clip"], ids=repr)
@presets
def test_bad_name(factory, argname, name):
  with pytest.raises(
    ValueError if name == "" else TypeError, match=rf"name.*{re.escape(repr(name))}"
  ):
    factory(1.0, name=name)


def test_per_example_global_norm_clip_threshold():
  grads = [jnp.array([[0.0, 3.0, 4.0], [6.0, 8.0, 0.0]])]
  summed, num_clipped = clipchain.per_example_global_norm_clip(grads, jnp.inf)
  np.testing.assert_array_equal(summed[0], [6.0, 11.0, 4.0])
  assert int(num_clipped) == 0
  summed, num_clipped = clipchain.per_example_global_norm_clip(grads, math.inf)
  assert int(num_clipped) == 0
  for bad, shown in ((-1.0, "-1.0"), (float("nan"), "nan"), (-jnp.inf, "-inf")):
    with pytest.raises(ValueError, match=rf"l2_norm_clip.*{shown}"):
      clipchain.per_example_global_norm_clip(grads, bad)


def test_per_example_layer_norm_clip_threshold():
  grads = [jnp.array([[0.0, 3.0, 4.0], [6.0, 8.0, 0.0]])]
  summed, num_clipped = clipchain.per_example_layer_norm_clip(grads, jnp.inf)
  np.testing.assert_array_equal(summed[0], [6.0, 11.0, 4.0])
  assert int(num_clipped[0]) == 0
  with pytest.raises(ValueError, match=r"global_l2_norm_clip.*-1"):
    clipchain.per_example_layer_norm_clip(grads, -1.0)

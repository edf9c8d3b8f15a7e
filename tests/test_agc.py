"""Adaptive gradient clipping: ``RelativeToParams`` and the ``adaptive_grad_clip`` preset.

Checked against ``optax.adaptive_grad_clip`` where optax is right (Flax layout, unstacked
kernels), against float64 NumPy where it has no equivalent (PyTorch layout, other
granularities), and against clipping each layer of a stack on its own.
"""

from __future__ import annotations

import inspect

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from harness import map_shapes

import clipchain
from clipchain.granularity import Element, Global, Layer
from clipchain.thresholds import RelativeToParams

RTOL = 1e-6
ATOL = 1e-7

# One leaf per rank 0..5 in the Flax layout, a (1, n) row that optax treats as one unit, and a
# zero-initialised bias whose threshold is clipping * eps.
FLAX_SHAPES = {
  "scale": (),
  "bias": (16,),
  "zero_bias": (8,),
  "row": (1, 8),
  "dense": {"kernel": (12, 16)},
  "heads": (12, 4, 8),
  "conv": (3, 3, 4, 8),
  "conv3d": (2, 3, 3, 4, 6),
}
# PyTorch (out, in, ...) weights; (8, 1) is eight units of one value each.
TORCH_SHAPES = {
  "bias": (16,),
  "linear": (8, 12),
  "column": (8, 1),
  "conv1d": (8, 4, 3),
  "conv2d": (8, 4, 3, 3),
  "conv3d": (6, 4, 2, 3, 3),
}


def make_tree(shapes, seed: int, unit_spread: float = 0.0):
  """Float32 normals; every value scaled by 10**U(-unit_spread, unit_spread) along its last axis
  and its first axis, so units differ in size whichever layout defines them."""
  rng = np.random.default_rng(seed)

  def leaf(shape):
    x = rng.normal(size=shape)
    if shape:
      x = x * 10.0 ** rng.uniform(-unit_spread, unit_spread, size=shape[-1])
      x = x * 10.0 ** rng.uniform(
        -unit_spread, unit_spread, size=(shape[0],) + (1,) * (len(shape) - 1)
      )
    return jnp.asarray(x, jnp.float32)

  return map_shapes(leaf, shapes)


def make_params_and_grads(shapes, seed: int):
  """Params, with ``zero_bias`` (if any) all zeros, and gradients ~20 times smaller whose units
  spread over two orders of magnitude, so that some units are clipped and others not."""
  params = make_tree(shapes, seed, unit_spread=0.5)
  if "zero_bias" in params:
    params["zero_bias"] = jnp.zeros_like(params["zero_bias"])
  grads = jax.tree.map(lambda x: 0.05 * x, make_tree(shapes, seed + 1, unit_spread=1.0))
  return params, grads


def agc_update(grads, params, clipping=0.02, eps=1e-3, axis=None, *, reference=False, **kwargs):
  """One update of clipchain's ``adaptive_grad_clip`` (or optax's with ``reference=True``)."""
  if reference:
    tx = optax.adaptive_grad_clip(clipping, eps, axis)
  else:
    tx = clipchain.adaptive_grad_clip(clipping, eps, axis, **kwargs)
  return tx.update(grads, tx.init(params), params)


# Jitted once per tree structure and static configuration; clipping and eps are traced.
agc = jax.jit(agc_update, static_argnames=("axis", "reference", "layout", "stacked_axes"))


def unit_norms_np(x: np.ndarray, axes) -> np.ndarray:
  return np.sqrt(np.sum(np.square(x.astype(np.float64)), axis=axes, keepdims=True))


def torch_axes(x: np.ndarray):
  return tuple(range(1, x.ndim)) if x.ndim > 1 else None


def agc_np(grads, params, clipping, eps, axes_fn):
  """Float64 AGC with one unit per slice over ``axes_fn(leaf)``: returns the clipped leaves and
  the number of units clipped and in all."""
  out, clipped, units = [], 0, 0
  for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params)):
    g, p = np.asarray(g, np.float64), np.asarray(p, np.float64)
    axes = axes_fn(g)
    g_norm, p_norm = unit_norms_np(g, axes), unit_norms_np(p, axes)
    limit = clipping * np.maximum(p_norm, eps)
    out.append(g * np.minimum(1.0, limit / g_norm))
    clipped += int(np.sum(g_norm > limit))
    units += g_norm.size
  return out, clipped, units


# Parity with optax.


def test_same_positional_signature_as_optax():
  def positional(fn):
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [
      (p.name, p.default) for p in inspect.signature(fn).parameters.values() if p.kind in kinds
    ]

  assert positional(clipchain.adaptive_grad_clip) == positional(optax.adaptive_grad_clip)
  extra = inspect.signature(clipchain.adaptive_grad_clip).parameters
  for name in ("layout", "stacked_axes", "name"):
    assert extra[name].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("clipping", [0.003, 0.02, 0.1, 1.0])
@pytest.mark.parametrize("eps", [1e-3, 0.5])
def test_flax_layout_matches_optax(clipping, eps):
  params, grads = make_params_and_grads(FLAX_SHAPES, seed=0)
  ours, state = agc(grads, params, clipping, eps)
  theirs, _ = agc(grads, params, clipping, eps, reference=True)
  chex.assert_trees_all_close(ours, theirs, rtol=RTOL, atol=ATOL)
  chex.assert_trees_all_equal_dtypes(ours, grads)
  # The same clip by hand, which also counts the units that were clipped.
  expected, clipped, units = agc_np(grads, params, clipping, eps, optax_axes)
  for got, want in zip(jax.tree.leaves(ours), expected):
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-9)
  stats = clipchain.stats(state)
  assert 0 < clipped < units
  np.testing.assert_allclose(stats["adaptive_grad_clip/clipped_fraction"], clipped / units)


def test_eager_matches_optax():
  params, grads = make_params_and_grads({"conv": (3, 3, 4, 8), "bias": (8,)}, seed=1)
  ours, _ = agc_update(grads, params, 0.02)
  theirs, _ = agc_update(grads, params, 0.02, reference=True)
  chex.assert_trees_all_close(ours, theirs, rtol=RTOL, atol=ATOL)
  assert not np.allclose(ours["conv"], grads["conv"])


def optax_axes(x: np.ndarray):
  """The reduction axes ``optax.unitwise_norm`` uses, restated."""
  if np.squeeze(x).ndim <= 1:
    return None
  return {2: (0,), 3: (0,), 4: (0, 1, 2), 5: (0, 1, 2, 3)}[x.ndim]


@pytest.mark.parametrize("axis", [0, 1, -1, (0, 2), (1, 2)], ids=str)
def test_axis_matches_optax(axis):
  shapes = {"a": (6, 5, 4), "b": {"c": (3, 5, 7)}, "d": (2, 3, 2, 2, 3, 2)}
  params, grads = make_params_and_grads(shapes, seed=3)
  ours, _ = agc(grads, params, 0.03, 1e-3, axis)
  theirs, _ = agc(grads, params, 0.03, 1e-3, axis, reference=True)
  chex.assert_trees_all_close(ours, theirs, rtol=RTOL, atol=ATOL)
  assert not np.allclose(ours["a"], grads["a"])  # something was clipped


# The PyTorch layout.


def test_torch_layout_matches_float64_reference():
  params, grads = make_params_and_grads(TORCH_SHAPES, seed=5)
  ours, state = agc(grads, params, 0.02, layout="torch")
  expected, clipped, units = agc_np(grads, params, 0.02, 1e-3, torch_axes)
  for got, want in zip(jax.tree.leaves(ours), expected):
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-9)
  assert 0 < clipped < units
  assert units == 1 + 8 + 8 + 8 + 8 + 6  # the bias is one unit, every other leaf has 8 or 6
  np.testing.assert_allclose(
    clipchain.stats(state)["adaptive_grad_clip/clipped_fraction"], clipped / units
  )


def test_torch_layout_matches_optax_on_transposed_weights():
  """(out, in, ...) weights moved to (..., in, out) give optax's units, for ranks 1, 2, 4, 5."""
  shapes = {k: TORCH_SHAPES[k] for k in ("bias", "linear", "conv2d", "conv3d")}
  params, grads = make_params_and_grads(shapes, seed=6)
  ours, _ = agc(grads, params, 0.02, layout="torch")
  to_flax = lambda tree: jax.tree.map(lambda x: jnp.moveaxis(x, 0, -1), tree)
  theirs, _ = agc(to_flax(grads), to_flax(params), 0.02, reference=True)
  chex.assert_trees_all_close(to_flax(ours), theirs, rtol=RTOL, atol=ATOL)
  assert not np.allclose(ours["conv2d"], grads["conv2d"])


# Stacked (scanned) layers.

STACK = 4
STACKED_SHAPES = {
  "kernel": (STACK, 6, 5),
  "bias": (STACK, 5),
  "gain": (STACK,),
  "conv": (STACK, 3, 3, 2, 4),
}


def stacked_params_and_grads():
  params, grads = make_params_and_grads(STACKED_SHAPES, seed=7)
  # Layers of very different sizes, so that a norm across the stack clips differently.
  layer_scale = 10.0 ** np.linspace(-1.0, 1.0, STACK)
  grads = jax.tree.map(
    lambda x: x * layer_scale.reshape((STACK,) + (1,) * (x.ndim - 1)).astype(np.float32), grads
  )
  return params, grads


def test_stacked_axes_clips_each_layer_on_its_own():
  params, grads = stacked_params_and_grads()
  ours, _ = agc(grads, params, 0.02, stacked_axes=1)
  for layer in range(STACK):
    take = lambda tree, i=layer: jax.tree.map(lambda x: x[i], tree)
    expected, _ = agc(take(grads), take(params), 0.02, reference=True)
    chex.assert_trees_all_close(take(ours), expected, rtol=RTOL, atol=ATOL)

  # optax's default reduces the stack axis of the (L, in, out) kernel and the (L, out) bias.
  wrong, _ = agc(grads, params, 0.02, reference=True)
  assert not np.allclose(wrong["kernel"], ours["kernel"], rtol=1e-3)
  assert not np.allclose(wrong["bias"], ours["bias"], rtol=1e-3)


def test_stacked_torch_layout_matches_reference():
  params, grads = stacked_params_and_grads()
  params, grads = params["kernel"], grads["kernel"]  # (L, out, in) in the torch layout
  ours, _ = agc(grads, params, 0.02, layout="torch", stacked_axes=1)
  expected, clipped, _ = agc_np(grads, params, 0.02, 1e-3, lambda x: (2,))
  np.testing.assert_allclose(ours, expected[0], rtol=2e-6, atol=1e-9)
  assert clipped > 0


# Params.


def test_missing_params_is_an_error():
  params, grads = make_params_and_grads({"w": (4, 3)}, seed=8)
  tx = clipchain.adaptive_grad_clip(0.01)
  with pytest.raises(
    ValueError, match=r"needs the params: call tx\.update\(updates, state, params\)"
  ):
    tx.update(grads, tx.init(params))
  chained = optax.chain(clipchain.adaptive_grad_clip(0.01), optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"RelativeToParams\(clipping=0.01.*needs the params"):
    chained.update(grads, chained.init(params))


def test_params_of_another_shape_is_an_error():
  tx = clipchain.adaptive_grad_clip(0.01)
  grads = {"w": jnp.ones((4, 3))}
  with pytest.raises(ValueError, match=r"params are not shaped like.*w: \(4, 3\) -> \(4, 2\)"):
    tx.update(grads, tx.init(grads), {"w": jnp.ones((4, 2))})
  with pytest.raises(ValueError, match=r"params are not shaped like.*missing from the params"):
    tx.update(grads, tx.init(grads), {"v": jnp.ones((4, 3))})


# Other granularities: the same policy, with the params measured the same way.


def np_relative(grads, params, clipping, eps, kind):
  g = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
  p = [np.asarray(x, np.float64) for x in jax.tree.leaves(params)]
  if kind == "element":
    limits = [clipping * np.maximum(np.abs(b), eps) for b in p]
    return [np.clip(a, -c, c) for a, c in zip(g, limits)]
  if kind == "global":
    g_norm = np.sqrt(sum(np.sum(a * a) for a in g))
    p_norm = np.sqrt(sum(np.sum(b * b) for b in p))
    return [a * min(1.0, clipping * max(p_norm, eps) / g_norm) for a in g]
  g_norms = [np.linalg.norm(a) for a in g]
  p_norms = [np.linalg.norm(b) for b in p]
  return [a * min(1.0, clipping * max(pn, eps) / gn) for a, gn, pn in zip(g, g_norms, p_norms)]


@pytest.mark.parametrize(
  ("granularity", "kind", "clipping"),
  [(Global(), "global", 0.02), (Layer(), "layer", 0.03), (Element(), "element", 0.3)],
  ids=["global", "layer", "element"],
)
def test_other_granularities_match_reference(granularity, kind, clipping):
  params, grads = make_params_and_grads(FLAX_SHAPES, seed=9)
  policy = RelativeToParams(clipping, eps=1e-3)
  tx = clipchain.clip_norm(policy, granularity=granularity, name="rel")
  ours, state = jax.jit(tx.update)(grads, tx.init(params), params)
  expected = np_relative(grads, params, clipping, 1e-3, kind)
  for got, want in zip(jax.tree.leaves(ours), expected):
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-9)
  assert 0 < float(clipchain.stats(state)["rel/clipped_fraction"]) <= 1


def test_rms_layers_measure_params_as_rms():
  """With ``Layer(norm="rms")`` the params are measured as RMS too: the ratio is unchanged."""
  params = {"w": jnp.full((4,), 2.0)}
  grads = {"w": jnp.full((4,), 1.0)}
  tx = clipchain.clip_norm(RelativeToParams(0.25), granularity=Layer(norm="rms"))
  updates, state = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], 0.5)
  np.testing.assert_allclose(clipchain.stats(state)["clip_norm/threshold/w"], 0.5)


# Validation.


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    ({"clipping": -0.1}, "clipping"),
    ({"clipping": float("nan")}, "clipping"),
    ({"clipping": float("inf")}, "clipping"),
    ({"clipping": 0.01, "eps": -1e-3}, "eps"),
    ({"clipping": 0.01, "eps": float("inf")}, "eps"),
    ({"clipping": 0.01, "layout": "jax"}, "layout"),
    ({"clipping": 0.01, "stacked_axes": -1}, "stacked_axes"),
    ({"clipping": 0.01, "axis": "0"}, "axis"),
    ({"clipping": 0.01, "name": ""}, "name"),
  ],
)
def test_validation(kwargs, match):
  error = TypeError if isinstance(kwargs.get("axis"), str) else ValueError
  with pytest.raises(error, match=match):
    clipchain.adaptive_grad_clip(**kwargs)


def test_flax_rank_above_five_needs_axis():
  grads = {"w": jnp.ones((2, 2, 2, 2, 2, 2))}
  tx = clipchain.adaptive_grad_clip(0.01)
  with pytest.raises(ValueError, match="pass axis="):
    tx.init(grads)


# Composition: NFNet recipe, jit/vmap/scan, optax wrappers, dtypes.


class SmallNFNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), name="stem")(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.relu(nn.Dense(16, name="hidden")(x))
    return nn.Dense(10, name="classifier")(x)


def test_nfnet_recipe_masks_the_classifier():
  """AGC on every weight but the final classifier, before SGD with momentum, as in NFNets."""
  model = SmallNFNet()
  rng = np.random.default_rng(10)
  x = jnp.asarray(rng.normal(size=(4, 6, 6, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, size=4))
  params = model.init(jax.random.key(0), x)["params"]
  mask = jax.tree_util.tree_map_with_path(lambda path, _: path[0].key != "classifier", params)

  def loss(p):
    logits = model.apply({"params": p}, x)
    return 100.0 * optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def train(clip):
    tx = optax.chain(optax.masked(clip, mask), optax.sgd(0.1, momentum=0.9, nesterov=True))
    state = tx.init(params)

    @jax.jit
    def step(p, state):
      grads = jax.grad(loss)(p)
      updates, state = tx.update(grads, state, p)
      return optax.apply_updates(p, updates), state, grads, updates

    p, first = params, None
    for _ in range(2):
      p, state, grads, updates = step(p, state)
      first = first or (grads, updates)
    return p, state, first

  ours, state, (grads, updates) = train(clipchain.adaptive_grad_clip(0.01))
  theirs, _, _ = train(optax.adaptive_grad_clip(0.01))
  chex.assert_trees_all_close(ours, theirs, rtol=1e-5, atol=1e-6)
  # The classifier's first update is SGD's on the raw gradient (Nesterov: -lr * (1 + momentum) * g),
  # while the other layers' gradients were clipped.
  raw = jax.tree.map(lambda g: -0.1 * 1.9 * g, grads)
  chex.assert_trees_all_close(updates["classifier"], raw["classifier"], rtol=1e-6)
  assert not np.allclose(updates["hidden"]["kernel"], raw["hidden"]["kernel"], rtol=1e-3)
  fraction = clipchain.stats(state)["adaptive_grad_clip/clipped_fraction"]
  assert 0 < float(fraction) <= 1


def test_lax_scan_and_vmap():
  shapes = {"kernel": (12, 16), "bias": (16,)}
  params, _ = make_params_and_grads(shapes, seed=11)
  grads_seq = [make_params_and_grads(shapes, seed=20 + i)[1] for i in range(3)]
  stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  tx = optax.chain(clipchain.adaptive_grad_clip(0.02), optax.sgd(0.5))

  def step(carry, grads):
    p, state = carry
    updates, state = tx.update(grads, state, p)
    return (optax.apply_updates(p, updates), state), None

  (scanned, _), _ = jax.lax.scan(step, (params, tx.init(params)), stack(grads_seq))
  looped = params
  for grads in grads_seq:
    # The same steps by the jitted single update: SGD on the clipped gradient.
    looped = jax.tree.map(lambda p, u: p - 0.5 * u, looped, agc(grads, looped, 0.02)[0])
  chex.assert_trees_all_close(scanned, looped, rtol=1e-6, atol=1e-7)

  # vmap over independent (grads, params, state) triples clips each on its own.
  batch_params = [params, jax.tree.map(lambda x: 2.0 * x, params), scanned]
  single = clipchain.adaptive_grad_clip(0.02)
  states = jax.vmap(single.init)(stack(batch_params))
  updates, _ = jax.jit(jax.vmap(single.update))(stack(grads_seq), states, stack(batch_params))
  for i, (g, p) in enumerate(zip(grads_seq, batch_params)):
    got = jax.tree.map(lambda x, i=i: x[i], updates)
    chex.assert_trees_all_close(got, agc(g, p, 0.02)[0], rtol=1e-6, atol=1e-7)


def test_inject_hyperparams():
  params, grads = make_params_and_grads(FLAX_SHAPES, seed=12)
  # With the defaults it works as optax's own transforms do.
  tx = optax.inject_hyperparams(clipchain.adaptive_grad_clip)(0.02)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  chex.assert_trees_all_close(
    updates, agc(grads, params, 0.02, reference=True)[0], rtol=RTOL, atol=ATOL
  )
  # An int stacked_axes is injected as an array (traced in update): the axes it gives are fixed
  # at init, so it needs no static_args; a mapping is passed through as it is.
  small = {"heads": params["heads"], "bias": params["bias"]}
  small_grads = {"heads": grads["heads"], "bias": grads["bias"]}
  for stacked in (1, {"heads": 1}):
    tx = optax.inject_hyperparams(clipchain.adaptive_grad_clip)(0.02, stacked_axes=stacked)
    got, _ = jax.jit(tx.update)(small_grads, tx.init(small), small)
    # Each slice of "heads" (4, 8) is a layer of its own: AGC of each on its own.
    for i in range(12):
      want, _ = agc({"h": small_grads["heads"][i]}, {"h": small["heads"][i]}, 0.02, reference=True)
      np.testing.assert_allclose(got["heads"][i], want["h"], rtol=RTOL, atol=ATOL)
  # axis shapes the units: set to an int it cannot be a traced hyperparameter.
  with pytest.raises(TypeError, match="static_args"):
    tx = optax.inject_hyperparams(clipchain.adaptive_grad_clip)(0.02, axis=0)
    jax.jit(tx.update)(small_grads, tx.init(small), small)
  inject = optax.inject_hyperparams(
    clipchain.adaptive_grad_clip, static_args=("axis", "stacked_axes")
  )
  tx = inject(clipping=0.02, layout="flax")
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  expected, _ = agc(grads, params, 0.02, reference=True)
  chex.assert_trees_all_close(updates, expected, rtol=RTOL, atol=ATOL)


def test_bfloat16_updates_keep_their_dtype():
  params, grads = make_params_and_grads({"w": (8, 4), "b": (4,)}, seed=13)
  grads = jax.tree.map(lambda x: x.astype(jnp.bfloat16), grads)
  tx = clipchain.adaptive_grad_clip(0.02)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  chex.assert_trees_all_equal_dtypes(updates, grads)
  as_f32 = jax.tree.map(lambda x: x.astype(jnp.float32), grads)
  expected, _, _ = agc_np(as_f32, params, 0.02, 1e-3, optax_axes)
  for got, want in zip(jax.tree.leaves(updates), expected):
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2, atol=1e-6)

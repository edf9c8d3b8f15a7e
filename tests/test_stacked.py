"""Stacked (scanned) layers: each slice along the stacked axes is a layer of its own.

The tree mixes a stacked kernel boxed by Flax (``nn.Partitioned`` naming its first axis
``"layers"``: stacked without being told), a stacked bias given by ``stacked_axes``, a plain
kernel and a scalar. ``init`` sees the boxes, ``update`` the plain arrays, as in a training loop.
Every policy is run at the layer and unit granularities over a sequence with a zero slice, a spike
and a non-finite step, and compared with the policies' float64 equations
(``test_contract.reference_thresholds``) applied to each slice's norm computed in NumPy.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from catalog import POLICIES
from harness import assert_bits_equal
from jax import shard_map
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from test_contract import reference_thresholds

import clipchain
from clipchain import granularity as gran

L = 4  # layers in the stack
SHAPES = {"head": (8, 2), "scale": (), "stack": {"b": (L, 8), "k": (L, 8, 5)}}
STACKED = {"stack/b": 1}  # stack/k is stacked by its partition metadata
STEPS = 8
ZERO_SLICE, ZERO_STEPS = 2, (0, 3)  # slice 2 of the kernel is 0 on these steps
SPIKE, NONFINITE = 5, 6
KINDS = {
  "layer": lambda **kw: gran.Layer(stacked_axes=STACKED, **kw),
  "unit": lambda **kw: gran.Unit(stacked_axes=STACKED, **kw),
}


def _leaves(seed: int, steps: tuple[int, ...] = ()):
  rng = np.random.default_rng(seed)
  leaf = lambda s: rng.normal(size=steps + s).astype(np.float32)
  return {
    "head": leaf((8, 2)),
    "scale": leaf(()),
    "stack": {"b": leaf((L, 8)), "k": leaf((L, 8, 5))},
  }


def boxed(tree):
  """``tree`` as Flax boxes it: the stacked kernel in ``nn.Partitioned`` naming its layer axis."""
  out = jax.tree.map(jnp.asarray, tree)
  out["stack"]["k"] = nn.Partitioned(out["stack"]["k"], names=("layers", None, None))
  return out


PARAMS = _leaves(0)


def sequence(seed: int) -> dict:
  """``STEPS`` gradients (a leading steps axis): growing scales, a zero slice, a spike, a NaN."""
  seq = _leaves(seed, (STEPS,))
  scales = (1 + np.arange(STEPS)).astype(np.float32)
  seq = jax.tree.map(lambda x: x * scales.reshape((-1,) + (1,) * (x.ndim - 1)), seq)
  seq["stack"]["k"][ZERO_STEPS[0] : ZERO_STEPS[1], ZERO_SLICE] = 0.0
  seq["stack"]["k"][SPIKE, 1] *= 30.0
  seq["head"][NONFINITE, 0, 0] = np.nan
  return seq


# Each leaf's groups in NumPy: the leaf with a leading steps axis -> (steps, groups, values), the
# groups in the order clipchain names them; and back, a (steps, groups) factor -> the leaf's shape.
def _groups(kind: str, key: str, x: np.ndarray) -> np.ndarray:
  s = x.shape[0]
  if kind == "layer":
    return x.reshape(s, L, -1) if key.startswith("stack") else x.reshape(s, 1, -1)
  if key == "stack/k":  # units: (layer, output), the input axis reduced
    return np.swapaxes(x, 2, 3).reshape(s, L * 5, 8)
  if key == "stack/b":  # a vector per layer: one unit each
    return x.reshape(s, L, 8)
  if key == "head":
    return np.swapaxes(x, 1, 2)
  return x.reshape(s, 1, 1)


def _spread(kind: str, key: str, factor: np.ndarray, shape) -> np.ndarray:
  s = factor.shape[0]
  if not shape:
    return factor.reshape(s)
  if kind == "layer":
    return factor.reshape((s, -1) + (1,) * (len(shape) - 1))
  if key == "stack/k":
    return factor.reshape(s, L, 1, 5)
  if key == "stack/b":
    return factor.reshape(s, L, 1)
  if key == "head":
    return factor.reshape(s, 1, 2)
  return factor.reshape(s)


KEYS = ("head", "scale", "stack/b", "stack/k")  # jax.tree order


def _get(tree, key):
  for part in key.split("/"):
    tree = tree[part]
  return tree


def norms_of(kind: str, seq) -> tuple[np.ndarray, np.ndarray]:
  """The float64 norm of every group at every step, and the leaf of every group."""
  cols, leaf_of = [], []
  for i, key in enumerate(KEYS):
    grouped = _groups(kind, key, np.asarray(_get(seq, key), np.float64))
    cols.append(np.sqrt(np.sum(grouped**2, axis=-1)))
    leaf_of.extend([i] * grouped.shape[1])
  return np.concatenate(cols, axis=1), np.asarray(leaf_of)


def reference(kind: str, name: str, seq):
  """The per-group thresholds and the clipped updates of every step, in float64."""
  group_norms, leaf_of = norms_of(kind, seq)
  param_norms = norms_of(kind, jax.tree.map(lambda p: p[None], PARAMS))[0][0]
  # MaxEMA follows each group at the layer granularity, each whole leaf at the unit one.
  limits = reference_thresholds(name, group_norms, param_norms, leaf_of if kind == "unit" else None)
  scale = np.where(group_norms > limits, limits / np.where(group_norms > 0, group_norms, 1), 1.0)
  scale[np.isnan(group_norms)] = np.nan
  updates, start = {}, 0
  for key in KEYS:
    x = np.asarray(_get(seq, key), np.float64)
    count = _groups(kind, key, x).shape[1]
    updates[key] = x * _spread(kind, key, scale[:, start : start + count], x.shape[1:])
    start += count
  return group_norms, limits, updates


def _cases(kind):
  # A window per unit is refused: the groups grow with the leaves.
  return [p for p in POLICIES if not (kind == "unit" and p == "Percentile")]


def run_all(kind: str, seq, names):
  """Every policy in ``names``: eager init on the boxed params, then a jitted lax.scan over the
  plain gradients, as one program; per step the updates and the statistics."""
  txs = {n: clipchain.clip_norm(POLICIES[n](), granularity=KINDS[kind](), name="s") for n in names}
  states = {n: tx.init(boxed(PARAMS)) for n, tx in txs.items()}

  def scan_one(tx, state, grads):
    def step(state, g):
      updates, state = tx.update(g, state, PARAMS)
      return state, (updates, clipchain.stats(state))

    return jax.lax.scan(step, state, grads)[1]

  return jax.jit(lambda s, g: {n: scan_one(txs[n], s[n], g) for n in txs})(states, seq)


@pytest.mark.parametrize("kind", KINDS)
def test_every_policy_per_slice_equals_numpy(kind):
  seq = sequence(1)
  results = run_all(kind, jax.tree.map(jnp.asarray, seq), _cases(kind))
  for name, (updates, stats) in results.items():
    group_norms, limits, want = reference(kind, name, seq)
    for key in KEYS:
      np.testing.assert_allclose(
        np.asarray(_get(updates, key)), want[key], rtol=3e-5, atol=1e-6, equal_nan=True,
        err_msg=f"{name}: {key}",
      )  # fmt: skip
    judged = np.isfinite(group_norms).all(axis=1)
    if kind == "layer":
      # Statistics per slice, named by the slice: the norm and the threshold of each.
      names = ["head", "scale", *[f"stack/b/{i}" for i in range(L)]]
      names += [f"stack/k/{i}" for i in range(L)]
      for g, group in enumerate(names):
        got = np.asarray(stats[f"s/norm/{group}"])
        np.testing.assert_allclose(got, group_norms[:, g], rtol=2e-6, err_msg=f"{name}: {group}")
        got = np.asarray(stats[f"s/threshold/{group}"])[judged]
        np.testing.assert_allclose(got, limits[judged, g], rtol=3e-5, err_msg=f"{name}: {group}")
    else:
      got = np.asarray(stats["s/threshold"])[judged]
      np.testing.assert_allclose(got, limits[judged].mean(axis=1), rtol=3e-5, err_msg=name)


def test_agc_per_slice_equals_optax_leaf_by_leaf():
  """AGC on the mixed tree: each slice of a stacked leaf and each other leaf as optax clips it."""
  grads = jax.tree.map(lambda x: x[SPIKE], sequence(2))
  tx = clipchain.adaptive_grad_clip(0.05, stacked_axes=STACKED)
  got, state = jax.jit(tx.update)(grads, tx.init(boxed(PARAMS)), PARAMS)
  theirs = optax.adaptive_grad_clip(0.05)
  for key in KEYS:
    g, p = np.asarray(_get(grads, key)), np.asarray(_get(PARAMS, key))
    pieces = [(g[i], p[i]) for i in range(L)] if key.startswith("stack") else [(g, p)]
    want = [theirs.update({"x": gi}, theirs.init(None), {"x": pi})[0]["x"] for gi, pi in pieces]
    want = np.stack(want) if key.startswith("stack") else want[0]
    np.testing.assert_allclose(np.asarray(_get(got, key)), want, rtol=2e-6, atol=1e-8, err_msg=key)
  assert float(clipchain.stats(state)["adaptive_grad_clip/clipped_fraction"]) > 0


def _sharded_run(mesh, specs, tx, grads, params):
  put = lambda t: jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), t, specs)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p), donate_argnums=(1,))
  state = tx.init(put(params))
  out = []
  for t in range(STEPS):
    updates, state = step(put(jax.tree.map(lambda x, t=t: x[t], grads)), state, put(params))
    out.append((updates, clipchain.stats(state)))
  return out


@pytest.mark.parametrize("kind", KINDS)
def test_eight_devices_with_fsdp_shardings_match_one(kind):
  """jit with every leaf split over 8 devices along a non-layer axis: the 1-device numbers."""
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
  specs = {"head": P("fsdp"), "scale": P(), "stack": {"b": P(None, "fsdp"), "k": P(None, "fsdp")}}
  seq = sequence(3)
  # A stateful policy per layer; one that reads the (sharded) params per unit.
  for name in ("ZScore",) if kind == "layer" else ("RelativeToParams",):
    make = lambda name=name: clipchain.clip_norm(POLICIES[name](), granularity=KINDS[kind]())
    one = _sharded_run(jax.make_mesh((1,), ("fsdp",), axis_types=(AxisType.Auto,)),
                       jax.tree.map(lambda _: P(), specs, is_leaf=lambda s: isinstance(s, P)),
                       make(), seq, PARAMS)  # fmt: skip
    many = _sharded_run(mesh, specs, make(), seq, PARAMS)
    for (u1, s1), (u8, s8) in zip(one, many):
      for a, b in zip(jax.tree.leaves((u1, s1)), jax.tree.leaves((u8, s8))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_shard_map_with_the_layer_axis_split_matches_one_device(kind):
  """Inside shard_map each of 4 devices holds one layer of the stack (``stacked_mesh_axes``):
  the updates, and statistics named by the global layer index, are the single-device ones."""
  mesh = jax.make_mesh((4,), ("stage",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:4])
  specs = {"head": P(), "scale": P(), "stack": {"b": P("stage"), "k": P("stage")}}
  seq = jax.tree.map(jnp.asarray, sequence(4))
  # Plain arrays at init: both stacked leaves are named by stacked_axes.
  where = lambda **kw: getattr(gran, kind.title())(stacked_axes={"stack/": 1}, **kw)
  for name in ("Fixed", "ZScore"):
    ref = clipchain.clip_norm(POLICIES[name](), granularity=where(), name="s")
    split = clipchain.clip_norm(
      POLICIES[name](), granularity=where(stacked_mesh_axes="stage"), axis_name="stage", name="s"
    )

    def run(tx, grads):
      def step(state, g):
        updates, state = tx.update(g, state)
        return state, (updates, clipchain.stats(state))

      first = jax.tree.map(lambda x: x[0], grads)
      state = tx.update(first, tx.init(first))[1]
      return jax.lax.scan(step, state, jax.tree.map(lambda x: x[1:], grads))[1]

    want = jax.jit(lambda g, ref=ref: run(ref, g))(seq)
    seq_specs = jax.tree.map(lambda s: P(None, *s), specs, is_leaf=lambda s: isinstance(s, P))
    put = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), seq, seq_specs)
    got = jax.jit(
      shard_map(lambda g, split=split: run(split, g), mesh=mesh, in_specs=(seq_specs,),
                out_specs=(seq_specs, P()))
    )(put)  # fmt: skip
    assert sorted(got[1]) == sorted(want[1])
    assert kind == "unit" or "s/norm/stack/k/3" in got[1]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_monitor_leaves_updates_bit_identical_and_reports_float64_norms():
  grads = jax.tree.map(lambda x: x[SPIKE], sequence(5))
  grads["stack"]["k"] = grads["stack"]["k"].astype(jnp.bfloat16)
  grads["head"][1, 1] = -0.0
  tx = optax.chain(clipchain.monitor(stacked_axes=STACKED), optax.sgd(1.0))
  inner = clipchain.monitor(stacked_axes=STACKED)
  state = inner.init(boxed(PARAMS))
  grads = jax.tree.map(jnp.asarray, grads)
  passed, state = jax.jit(inner.update, donate_argnums=(1,))(grads, state)
  assert_bits_equal(passed, grads)
  stats = clipchain.stats(state)
  as64 = jax.tree.map(lambda x: np.asarray(x, np.float64), grads)
  np.testing.assert_allclose(
    float(stats["monitor/norm"]), np.sqrt(sum(np.sum(x**2) for x in jax.tree.leaves(as64))),
    rtol=1e-6,
  )  # fmt: skip
  for i in range(L):
    for key in ("stack/b", "stack/k"):
      want = np.sqrt(np.sum(_get(as64, key)[i] ** 2))
      np.testing.assert_allclose(float(stats[f"monitor/norm/{key}/{i}"]), want, rtol=1e-6)
  # In a chain it changes nothing either: SGD(1) after it gives -grads, bit for bit.
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  assert_bits_equal(updates, jax.tree.map(lambda g: -g, grads))


def test_a_guard_reuses_the_monitors_norm():
  """A chain that starts with the monitor: the guard decides from its norm, measured once."""
  tx = clipchain.skip_nonfinite(optax.chain(clipchain.monitor("global"), optax.adam(0.1)))
  grads = jax.tree.map(lambda x: jnp.asarray(x[NONFINITE]), sequence(6))
  _, state = tx.update(grads, tx.init(PARAMS), PARAMS)
  assert bool(state.skipped) and np.isnan(float(state.grad_norm))
  # A finite step: the guard's norm is the monitor's, bit for bit.
  grads = jax.tree.map(lambda x: jnp.asarray(x[1]), sequence(6))
  _, state = tx.update(grads, state, PARAMS)
  assert not bool(state.skipped)
  assert float(state.grad_norm) == float(state.inner_state[0].norm)


def test_flax_scanned_model_is_split_per_layer_from_its_metadata():
  """A linen nn.scan of Dense blocks with partition metadata: per-layer names with no argument,
  the same for boxed and unboxed updates; stacked_axis_name=None treats the stack as one."""

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      dense = nn.Dense(
        4, kernel_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("embed", "mlp"))
      )
      return jnp.tanh(dense(x)), None

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      scan = nn.scan(
        Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )  # fmt: skip
      return scan(name="blocks")(x, None)[0]

  x = jnp.ones((2, 4))
  params = Model().init(jax.random.key(0), x)["params"]
  grads = jax.grad(lambda p: jnp.sum(Model().apply({"params": p}, x) ** 2))(params)
  tx = clipchain.clip_by_layer_norm(1e-3)
  state = tx.init(params)
  for g in (grads, nn.unbox(grads)):
    _, state = jax.jit(tx.update)(g, state)
    stats = clipchain.stats(state)
    kernels = nn.unbox(g)["blocks"]["Dense_0"]["kernel"]
    for i in range(3):
      want = np.linalg.norm(np.asarray(kernels[i], np.float64))
      got = float(stats[f"clip_by_layer_norm/norm/blocks/Dense_0/kernel/{i}"])
      np.testing.assert_allclose(got, want, rtol=1e-6)
  whole = clipchain.clip_norm(1.0, granularity=gran.Layer(stacked_axis_name=None))
  assert whole.init(params).layer_names == ("blocks/Dense_0/bias", "blocks/Dense_0/kernel")


def test_nnx_variables_with_a_layers_axis_through_nnx_optimizer():
  """NNX: init on Variables whose sharding names a "layers" axis, update on plain arrays."""
  from flax import nnx

  class Stack(nnx.Module):
    def __init__(self):
      kernel = jnp.asarray(PARAMS["stack"]["k"])
      self.kernel = nnx.Param(kernel, out_sharding=("layers", None, None), eager_sharding=False)
      self.head = nnx.Param(jnp.asarray(PARAMS["head"]))

    def __call__(self, x):
      for i in range(L):
        x = jnp.tanh(x @ self.kernel[i] @ self.kernel[i].T)
      return x @ self.head

  model = Stack()
  optimizer = nnx.Optimizer(model, optax.chain(clipchain.monitor(), optax.sgd(0.1)), wrt=nnx.Param)
  grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 8)))))(model)
  optimizer.update(model, grads)
  stats = clipchain.stats(optimizer.opt_state)
  kernel_grads = np.asarray(grads["kernel"].get_value(), np.float64)
  for i in range(L):
    np.testing.assert_allclose(
      float(stats[f"monitor/norm/kernel/{i}"]), np.linalg.norm(kernel_grads[i]), rtol=1e-6
    )


def test_module_layers_of_a_stack_and_the_stacked_axes_spec_forms():
  params = jax.tree.map(jnp.asarray, PARAMS)
  params["stack"]["k"] = nn.Partitioned(params["stack"]["k"], names=("layers", None, None))
  by_module = gran.Layer("module", stacked_axes=STACKED).bind(params)
  assert by_module.groups(params).names == ("head", "scale", *[f"stack/{i}" for i in range(L)])
  plain = jax.tree.map(jnp.asarray, PARAMS)
  for spec in ({"stack/": 1}, lambda path, leaf: int(path.startswith("stack"))):
    names = gran.Layer(stacked_axes=spec).groups(plain).names
    assert (
      names[:2] == ("head", "scale") and names[-1] == f"stack/k/{L - 1}" and len(names) == 2 + 2 * L
    )
  # Two stacked axes: slices named by both indices.
  two = gran.Layer(stacked_axes={"k": 2}).groups({"k": jnp.zeros((2, 3, 5))}).names
  assert two == tuple(f"k/{i}/{j}" for i in range(2) for j in range(3))


def test_bad_stacked_axes_are_refused_naming_the_argument():
  with pytest.raises(TypeError, match=r"stacked_axes must be an int.*'1' of type str"):
    gran.Layer(stacked_axes="1")
  with pytest.raises(ValueError, match=r"stacked_axes must be an integer >= 0; got -1"):
    gran.Unit(stacked_axes=-1)
  with pytest.raises(ValueError, match=r"stacked_axes key '\(' is not a valid regular expression"):
    gran.Layer(stacked_axes={"(": 1})
  with pytest.raises(TypeError, match=r"stacked_axes must map path regular expressions"):
    gran.Layer(stacked_axes={1: 1})
  with pytest.raises(ValueError, match=r"'scale' has 0 axes, fewer than the 1 stacked axes"):
    clipchain.clip_by_layer_norm(1.0, stacked_axes=1).init(PARAMS)
  with pytest.raises(TypeError, match=r"callable must return an int >= 0.*'head'"):
    clipchain.clip_by_layer_norm(1.0, stacked_axes=lambda p, x: "x").init(PARAMS)
  with pytest.raises(ValueError, match=r"stacked_axes applies to the 'layer' and 'unit'"):
    clipchain.zclip(stacked_axes=1)
  with pytest.raises(ValueError, match=r"give it to the granularity itself"):
    clipchain.zclip(granularity=gran.Layer(), stacked_axes=1)
  with pytest.raises(ValueError, match=r"layer 'stack' holds leaves stacked differently"):
    clipchain.clip_by_layer_norm(1.0, layers="module", stacked_axes={"/k$": 1}).init(PARAMS)
  with pytest.raises(ValueError, match=r"reduces the stacked axes"):
    clipchain.adaptive_grad_clip(0.1, axis=0, stacked_axes=1).init(PARAMS["stack"])


def test_every_preset_that_takes_a_granularity_takes_stacked_axes():
  plain = jax.tree.map(jnp.asarray, PARAMS)
  want = gran.Layer(stacked_axes=STACKED).groups(plain).names
  for preset in (
    clipchain.zclip, clipchain.autoclip, clipchain.quantile_clip, clipchain.adagc,
    clipchain.spam_clip, clipchain.normalize, clipchain.monitor,
  ):  # fmt: skip
    tx = preset(granularity="layer", stacked_axes=STACKED)
    assert tx.init(plain).layer_names == want, preset.__name__
  for tx in (
    clipchain.clip_by_layer_norm(1.0, stacked_axes=STACKED),
    clipchain.clip_by_block_rms(1.0, stacked_axes=STACKED),
    clipchain.clip_by_second_moment(optax.adam(0.1), b2=0.999, stacked_axes=STACKED),
  ):
    state = tx.init(plain)
    assert clipchain.stats(state) and jax.tree.leaves(state)
    names = state.layer_names
    assert names == want

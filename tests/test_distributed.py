"""Every transform and guard (also as a guarded step) gives its single-device result under pmap,
shard_map and sharded jit.

The 8 CPU devices are forced in ``conftest.py``, before any test module creates an array. Each
transform runs a few steps (past every warmup, with a spike at ``SPIKE``) in each setting and is
compared with the same steps on one device, on the gathered arrays:

* ``pmap`` data-parallel: gradients ``pmean``-ed, then the transform without ``axis_name``;
* ``pmap`` model-parallel: every leaf split along axis 0, the transform with ``axis_name="dp"``;
* ``shard_map`` on a ``(data=4, model=2)`` mesh with ``check_vma=True``: some leaves split over
  ``"model"``, some replicated, per-data-shard gradients ``pmean``-ed over ``"data"``, then the
  transform with ``axis_name="model"``;
* ``jit`` with FSDP shardings (every leaf split over 8 devices along axis 0) and no ``axis_name``.

Statistics come out of ``shard_map`` with ``out_specs=P()``: with ``check_vma=True`` JAX refuses
a value that may differ between devices there, and each device's own buffer is then compared.

The gradients are multiples of 2**-10 and each device's share differs from the mean by terms that
cancel in pairs, so the ``pmean`` of the shards is exactly the single-device gradient.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax, shard_map
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import clipchain

N = 8
LR = 0.1
GRAD_SCALES = (1.0, 1.5, 0.8, 1.2, 6.0, 1.0)
SPIKE = 4
NAN_STEP = 2
RTOL, ATOL = 2e-5, 1e-6

# A two-layer MLP, 32 -> 40 -> 8, Flax layout (in, out). The shards of each layout have shapes no
# other state leaf has (3 layers, windows of 2, 4 and 10), so that `_param_spec` can tell which
# state leaves are laid out like a parameter; no shard has a size-1 axis.
SHAPES = {"dense": {"kernel": (32, 40), "bias": (40,)}, "head": {"kernel": (40, 8)}}

# shard_map layouts on the (data, model) mesh. MIXED: one kernel split along its output axis, one
# along its input axis, the bias replicated. AGC measures one norm per output unit (a column of a
# Flax kernel), summed across devices only where a unit is split: a kernel split along its input
# (reduced) axis, as in REDUCED, is measured correctly; a kernel split along its output axis
# (MIXED's dense kernel) holds whole units on each device and must not be given to AGC with
# axis_name naming that axis, since its unit norms would be summed over different units (see
# Unit.measure in clipchain/_src/granularity.py).
MIXED = {"dense": {"kernel": P(None, "model"), "bias": P()}, "head": {"kernel": P("model", None)}}
REDUCED = {"dense": {"kernel": P("model", None), "bias": P()}, "head": {"kernel": P("model", None)}}
FSDP = {"dense": {"kernel": P("fsdp"), "bias": P("fsdp")}, "head": {"kernel": P("fsdp")}}


def _inner(axis_name=None):
  return optax.chain(clipchain.clip_by_global_norm(5.0, axis_name=axis_name), optax.adam(1e-2))


def _sgd(preset):
  return lambda axis_name=None: optax.chain(preset(axis_name), optax.sgd(LR))


# Each entry builds the whole optimizer for a given axis_name; the presets are followed by SGD so
# that their output moves the parameters (and AGC sees them move).
TRANSFORMS = {
  "clip": _sgd(lambda a: clipchain.clip(0.3, clip_statistics=True, axis_name=a)),
  "clip_by_global_norm": _sgd(lambda a: clipchain.clip_by_global_norm(5.0, axis_name=a)),
  "clip_by_block_rms": _sgd(lambda a: clipchain.clip_by_block_rms(0.2, axis_name=a)),
  "clip_by_layer_norm": _sgd(lambda a: clipchain.clip_by_layer_norm(2.0, axis_name=a)),
  "adaptive_grad_clip": _sgd(lambda a: clipchain.adaptive_grad_clip(0.2, axis_name=a)),
  "autoclip": _sgd(lambda a: clipchain.autoclip(50.0, window=10, axis_name=a)),
  "zclip": _sgd(
    lambda a: clipchain.zclip(warmup_steps=2, z_thresh=2.0, max_grad_norm=None, axis_name=a)
  ),
  "quantile_clip": _sgd(lambda a: clipchain.quantile_clip(initial_threshold=4.0, axis_name=a)),
  "adagc": _sgd(lambda a: clipchain.adagc(warmup_steps=2, warmup_max_norm=5.0, axis_name=a)),
  "spam_clip": _sgd(
    lambda a: clipchain.spam_clip(
      threshold=2.0, beta2=0.5, warmup_steps=2, clip_statistics=True, axis_name=a
    )
  ),
  "normalize": _sgd(lambda a: clipchain.normalize(2.0, granularity="layer", axis_name=a)),
  "stable_spam_clip": _sgd(
    lambda a: clipchain.stable_spam_clip(theta=0.5, clip_statistics=True, axis_name=a)
  ),
  "clip_by_second_moment": lambda a=None: clipchain.clip_by_second_moment(
    optax.adam(1e-2, b2=0.9), b2=0.9, axis_name=a
  ),
  "skip_nonfinite": lambda a=None: clipchain.skip_nonfinite(_inner(a), axis_name=a),
  "skip_spikes": lambda a=None: clipchain.skip_spikes(
    _inner(a), window=4, min_history=2, sigma=2.0, axis_name=a
  ),
}


def _guarded(make_guard):
  """A guard run by clipchain.guarded_step, seen as a transform whose update is the step's change
  of the parameters, so that every check here applies to it unchanged."""

  def build(axis_name=None):
    guard = make_guard(axis_name)
    step = clipchain.guarded_step(guard)

    def update(grads, state, params):
      new_params, state = step(params, state, grads)
      return jax.tree.map(lambda n, p: n - p, new_params, params), state

    return optax.GradientTransformation(guard.init, update)

  return build


TRANSFORMS["guarded_step(skip_nonfinite)"] = _guarded(TRANSFORMS["skip_nonfinite"])
TRANSFORMS["guarded_step(skip_spikes)"] = _guarded(TRANSFORMS["skip_spikes"])
GUARDS = ("skip_nonfinite", "skip_spikes")
GUARDED_STEPS = {
  "guarded_step(skip_nonfinite)": "skip_nonfinite",
  "guarded_step(skip_spikes)": "skip_spikes",
}
# Transforms that change every group on every step by design (the normalize rule).
ALWAYS_ACTS = ("normalize",)
# The name of the clip whose statistics say how much was clipped, per transform.
CLIP_NAME = (
  {name: name for name in TRANSFORMS}
  | {g: "clip_by_global_norm" for g in (*GUARDS, *GUARDED_STEPS)}
  | {"stable_spam_clip": "stable_spam_clip_adaclip"}
)


# ---------------------------------------------------------------------------------------------
# Data: parameters, the mean gradient of each step, and its shares on each device


def _dyadic(rng, shape, scale):
  """Normal values rounded to multiples of 2**-10: their sums over a few shards are exact."""
  return (np.round(rng.normal(0.0, scale, shape) * 1024) / 1024).astype(np.float32)


def _tree(fn):
  return jax.tree.map(fn, SHAPES, is_leaf=lambda s: isinstance(s, tuple))


_rng = np.random.default_rng(0)
PARAMS = _tree(lambda s: _dyadic(_rng, s, 1.0))
# (steps, *shape): the gradient of each step, as one device sees it once averaged.
GRADS = _tree(lambda s: np.stack([_dyadic(_rng, s, 0.1 * c) for c in GRAD_SCALES]))


def _shares(grads, n):
  """(n, steps, *shape): n per-device gradients whose mean is exactly ``grads``."""

  def split(g):
    r = _dyadic(_rng, (n // 2, *g.shape), 0.1)
    return np.stack([g + sign * r[i // 2] for i, sign in zip(range(n), [1, -1] * n)])

  return jax.tree.map(split, grads)


SHARES_8 = _shares(GRADS, N)
SHARES_4 = _shares(GRADS, 4)


def _with_nan(grads, index):
  """``grads`` with a NaN at ``index`` of the dense kernel."""
  grads = jax.tree.map(np.copy, grads)
  grads["dense"]["kernel"][index] = np.nan
  return grads


# ---------------------------------------------------------------------------------------------
# Running a transform


def _run(tx, params, grads, reduce=lambda g: g, *, first_apart=False):
  """One update per leading entry of ``grads``, applied to ``params``, in a scan.

  Returns the updates and ``clipchain.stats`` of every step (stacked), the final params and state.
  ``first_apart``: the first step outside the scan, for shard_map, where the state init returns
  varies along no mesh axis and the state after an update along those of the leaves it is laid
  out like (a scan's carry must keep its type).
  """

  def step(carry, grads):
    params, state = carry
    updates, state = tx.update(reduce(grads), state, params)
    return (optax.apply_updates(params, updates), state), (updates, clipchain.stats(state))

  carry = (params, tx.init(params))
  if not first_apart:
    carry, (updates, stats) = lax.scan(step, carry, grads)
    return updates, stats, *carry
  carry, first = step(carry, jax.tree.map(lambda g: g[0], grads))
  carry, rest = lax.scan(step, carry, jax.tree.map(lambda g: g[1:], grads))
  updates, stats = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, rest)
  return updates, stats, *carry


_REFERENCE_CACHE = {}


def _reference(name, without_step=None):
  """The single-device run on the gathered arrays, optionally without one step's batch."""
  key = (name, without_step)
  if key not in _REFERENCE_CACHE:
    tx = TRANSFORMS[name]()
    grads = GRADS
    if without_step is not None:
      grads = jax.tree.map(lambda g: np.delete(g, without_step, axis=0), grads)
    _REFERENCE_CACHE[key] = jax.jit(lambda p, g: _run(tx, p, g))(PARAMS, grads)
  return _REFERENCE_CACHE[key]


def _local_shape(shape, spec, mesh):
  return tuple(
    d // math.prod(mesh.shape[a] for a in ((s,) if isinstance(s, str) else s or ()))
    for d, s in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))
  )


def _param_spec(local_shapes, specs):
  """For a state leaf, the spec of the parameter whose shard it is shaped like (else ``P()``).

  Optimizer states are laid out like the parameters (Adam's moments, SPAM's per-value moment);
  every other state leaf (counters, histories, per-layer values) is replicated.
  """
  sharded = {
    shape: spec
    for shape, spec in zip(jax.tree.leaves(local_shapes, is_leaf=_is_shape), jax.tree.leaves(specs))
    if spec != P()
  }
  assert len(sharded) == sum(s != P() for s in jax.tree.leaves(specs)), "ambiguous shard shapes"
  return lambda leaf: sharded.get(tuple(leaf.shape), P())


def _is_shape(x):
  return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


# ---------------------------------------------------------------------------------------------
# Checks


def _assert_close(actual, expected, what):
  pairs = zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected), strict=True)
  for (path, a), e in pairs:
    np.testing.assert_allclose(
      np.asarray(a),
      np.asarray(e),
      rtol=RTOL,
      atol=ATOL,
      err_msg=f"{what}{jax.tree_util.keystr(path)}",
    )


def _assert_same_on_every_device(tree, what):
  """Every device holding a given shard of each array holds the same values, bit for bit."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    first = {}
    for shard in leaf.addressable_shards:
      key = repr(shard.index)
      if key in first:
        np.testing.assert_array_equal(
          np.asarray(shard.data), first[key], err_msg=f"{what}{path} on {shard.device}"
        )
      else:
        first[key] = np.asarray(shard.data)
    assert len(leaf.addressable_shards) == N


def _assert_stacked_identical(tree, what):
  """A ``pmap`` output: the entry of every device equals the first's, bit for bit."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    leaf = np.asarray(leaf)
    assert leaf.shape[0] == N
    for i in range(1, N):
      np.testing.assert_array_equal(leaf[i], leaf[0], err_msg=f"{what}{path} on device {i}")


def _assert_clipped_to_threshold(name, stats):
  """Where the global clip scaled the tree down, its output norm is the threshold."""
  clip = CLIP_NAME[name]
  clipped = np.asarray(stats[f"{clip}/clipped_fraction"]) == 1.0
  assert clipped.any()
  np.testing.assert_allclose(
    np.asarray(stats[f"{clip}/clipped_norm"])[clipped],
    np.asarray(stats[f"{clip}/threshold"])[clipped],
    rtol=1e-6,
  )


GLOBAL_CLIPS = (
  "clip_by_global_norm",
  "autoclip",
  "zclip",
  "quantile_clip",
  *GUARDS,
  *GUARDED_STEPS,
)


def test_devices():
  assert jax.device_count() == N


def test_reference_runs_clip_and_skip():
  """The data make every transform act on some step, so the comparisons below mean something."""
  for name in TRANSFORMS:
    _, stats, _, _ = _reference(name)
    fraction = np.asarray(stats[f"{CLIP_NAME[name]}/clipped_fraction"])
    assert (fraction > 0).any(), name
    if name not in ALWAYS_ACTS:
      assert (fraction < 1).any(), name
  _, stats, _, _ = _reference("skip_spikes")
  np.testing.assert_array_equal(np.asarray(stats["skip_spikes/skipped"]), np.eye(6)[SPIKE])


# ---------------------------------------------------------------------------------------------
# pmap


# A guarded step on pmean-ed gradients is its single-device step, tested in test_guarded_step.py.
@pytest.mark.parametrize("name", [n for n in TRANSFORMS if n not in GUARDED_STEPS])
def test_pmap_data_parallel(name):
  """``pmean`` then the transform without axis_name is the single-device run on the mean gradient.

  The pitfall: naming the axis after the ``pmean`` sums a gradient that is already the global one
  over the devices again, so every norm is sqrt(n) times too large (pmap does not track which axes
  a value varies along, so ``axis_name`` cannot tell).
  """
  mean = lambda g: lax.pmean(g, "dp")
  right, wrong = TRANSFORMS[name](), TRANSFORMS[name]("dp")

  def run(grads, params):
    first = mean(jax.tree.map(lambda g: g[0], grads))
    _, overcounted = wrong.update(first, wrong.init(params), params)
    return _run(right, params, grads, mean), clipchain.stats(overcounted)

  out, wrong_stats = jax.pmap(run, axis_name="dp", in_axes=(0, None))(SHARES_8, PARAMS)
  _assert_stacked_identical(out, "")
  ref = _reference(name)
  _assert_close(jax.tree.map(lambda x: x[0], out), ref, "")
  clip = CLIP_NAME[name]
  if name == "clip_by_second_moment":
    # A mean square: summed over the devices and divided by their total size, it is not
    # over-counted (but the moments it reads are the mean gradient's either way).
    np.testing.assert_allclose(
      np.asarray(wrong_stats[f"{clip}/rms"]), ref[1][f"{clip}/rms"][0], rtol=RTOL
    )
    return
  np.testing.assert_allclose(
    np.asarray(wrong_stats[f"{clip}/norm"]),
    np.full(N, math.sqrt(N) * ref[1][f"{clip}/norm"][0]),
    rtol=RTOL,
  )


def _split(x, axis=0):
  """A global array as N device shards along ``axis``, stacked first."""
  return np.stack(np.split(np.asarray(x), N, axis=axis))


def _unsplit(x, axis=0):
  return np.concatenate(list(np.asarray(x)), axis=axis)


def _run_model_parallel(name, grads, axis_name="dp"):
  tx = TRANSFORMS[name](axis_name)
  run = jax.pmap(lambda g, p: _run(tx, p, g), axis_name="dp")
  return run(jax.tree.map(lambda g: _split(g, axis=1), grads), jax.tree.map(_split, PARAMS))


def _gather_model_parallel(state):
  """A model-parallel pmap state as one state: parameter-shaped leaves joined, others the same."""
  local = _tree(lambda s: (s[0] // N, *s[1:]))
  spec_of = _param_spec(local, _tree(lambda s: P("dp")))

  def gather(leaf):
    if spec_of(leaf[0]) == P():
      _assert_stacked_identical(leaf, "state ")
      return np.asarray(leaf[0])
    return _unsplit(leaf)

  return jax.tree.map(gather, state)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_pmap_model_parallel(name):
  """Every leaf split along axis 0 over the devices: with axis_name the norms are the gathered
  ones, so the updates are the single-device run's and the statistics the same on every device."""
  updates, stats, params, state = _run_model_parallel(name, GRADS)
  _assert_stacked_identical(stats, "stats ")
  ref_updates, ref_stats, ref_params, ref_state = _reference(name)
  _assert_close(jax.tree.map(lambda x: _unsplit(x, axis=1), updates), ref_updates, "updates")
  _assert_close(jax.tree.map(lambda x: x[0], stats), ref_stats, "stats")
  _assert_close(jax.tree.map(_unsplit, params), ref_params, "params")
  _assert_close(_gather_model_parallel(state), ref_state, "state")


# ---------------------------------------------------------------------------------------------
# shard_map on a (data, model) mesh


MESH = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)


def _run_shard_map(name, grads, specs, *, axis_name="model", check_vma=True):
  """``grads``: (4, steps, *shape), one gradient per data shard, averaged inside."""
  tx = TRANSFORMS[name](axis_name)
  local = jax.tree.map(lambda s, sp: _local_shape(s, sp, MESH), SHAPES, specs, is_leaf=_is_shape)
  spec_of = _param_spec(local, specs)
  structs = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), local, is_leaf=_is_shape)
  state_specs = jax.tree.map(spec_of, jax.eval_shape(tx.init, structs))
  grad_specs = jax.tree.map(lambda s: P("data", None, *s), specs)
  step_specs = jax.tree.map(lambda s: P(None, *s), specs)

  def body(params, grads):
    grads = jax.tree.map(lambda g: g[0], grads)
    return _run(tx, params, grads, lambda g: lax.pmean(g, "data"), first_apart=True)

  run = jax.jit(
    shard_map(
      body,
      mesh=MESH,
      in_specs=(specs, grad_specs),
      out_specs=(step_specs, P(), specs, state_specs),
      check_vma=check_vma,
    )
  )
  put = lambda x, s: jax.device_put(x, NamedSharding(MESH, s))
  return run(jax.tree.map(put, PARAMS, specs), jax.tree.map(put, grads, grad_specs))


@pytest.mark.parametrize("name", TRANSFORMS)
def test_shard_map(name):
  """Leaves split over "model" and replicated ones, norms across "model": the single-device run.

  Updates, parameters, state and every statistic equal the single-device run on the gathered
  arrays, and every device holding a copy of a value holds the same one.
  """
  specs = REDUCED if name == "adaptive_grad_clip" else MIXED
  out = _run_shard_map(name, SHARES_4, specs)
  _assert_same_on_every_device(out, "")
  updates, stats, params, state = out
  ref_updates, ref_stats, ref_params, ref_state = _reference(name)
  _assert_close(updates, ref_updates, "updates")
  _assert_close(stats, ref_stats, "stats")
  _assert_close(params, ref_params, "params")
  _assert_close(state, ref_state, "state")
  if name in GLOBAL_CLIPS:
    _assert_clipped_to_threshold(name, stats)
  if name == "clip_by_global_norm":
    squares = [np.square(np.asarray(u) / LR).reshape(len(u), -1) for u in jax.tree.leaves(updates)]
    np.testing.assert_allclose(np.sqrt(sum(s.sum(axis=1) for s in squares))[SPIKE], 5.0, rtol=1e-6)


def test_shard_map_axis_names_tuple():
  """Naming both mesh axes is the same: nothing varies along "data" after the pmean."""
  out = _run_shard_map("clip_by_global_norm", SHARES_4, MIXED, axis_name=("data", "model"))
  _assert_same_on_every_device(out, "")
  _assert_close(out[1], _reference("clip_by_global_norm")[1], "stats")


def test_shard_map_without_vma_tracking_overcounts_replicated_leaves():
  """With ``check_vma=False`` JAX does not say which leaves vary, so every leaf is summed over the
  named axes: the replicated bias is counted once per "model" device (distributed.py says to name
  only axes along which every leaf is split there)."""
  _, stats, _, _ = _run_shard_map("clip_by_global_norm", SHARES_4, MIXED, check_vma=False)
  _, ref_stats, _, _ = _reference("clip_by_global_norm")
  bias_squares = np.sum(np.square(GRADS["dense"]["bias"]), axis=1, dtype=np.float64)
  np.testing.assert_allclose(
    np.square(np.asarray(stats["clip_by_global_norm/norm"], np.float64)),
    np.square(np.asarray(ref_stats["clip_by_global_norm/norm"], np.float64)) + bias_squares,
    rtol=1e-5,
  )
  assert np.all(stats["clip_by_global_norm/norm"] > ref_stats["clip_by_global_norm/norm"] * 1.001)


def test_shard_map_gradients_by_autodiff():
  """A Megatron-style step: gradients by ``jax.grad`` inside shard_map, then the guarded clip.

  With ``check_vma=True`` the gradient of a parameter that does not vary along an axis comes out
  summed over that axis: the kernels' over "data", the replicated bias's over both axes. So the
  local loss is divided by the number of data shards, and the ``pmean`` over "data" that follows
  changes nothing. The clip, the skip decision and the step equal those of one device.
  """
  rng = np.random.default_rng(1)
  x, y = _dyadic(rng, (16, 32), 1.0), _dyadic(rng, (16, 8), 1.0)
  tx = TRANSFORMS["skip_nonfinite"]("model")

  def local_loss(params, x, y):
    width = params["dense"]["kernel"].shape[1]  # this device's columns of the dense layer
    bias = lax.dynamic_slice_in_dim(params["dense"]["bias"], lax.axis_index("model") * width, width)
    hidden = jnp.tanh(x @ params["dense"]["kernel"] + bias)
    out = lax.psum(hidden @ params["head"]["kernel"], "model")
    return jnp.mean(jnp.square(out - y)) / MESH.shape["data"]

  def step(params, x, y):
    summed = jax.grad(local_loss)(params, x, y)
    grads = lax.pmean(summed, "data")
    updates, state = tx.update(grads, tx.init(params), params)
    return summed, grads, optax.apply_updates(params, updates), clipchain.stats(state)

  run = jax.jit(
    shard_map(
      step,
      mesh=MESH,
      in_specs=(MIXED, P("data"), P("data")),
      out_specs=(MIXED, MIXED, MIXED, P()),
    )
  )
  put = lambda x, s: jax.device_put(x, NamedSharding(MESH, s))
  out = run(jax.tree.map(put, PARAMS, MIXED), put(x, P("data")), put(y, P("data")))
  _assert_same_on_every_device(out, "")
  summed, grads, params, stats = out

  def loss(params, x, y):
    hidden = jnp.tanh(x @ params["dense"]["kernel"] + params["dense"]["bias"])
    return jnp.mean(jnp.square(hidden @ params["head"]["kernel"] - y))

  def reference(params, x, y):
    grads = jax.grad(loss)(params, x, y)
    ref_tx = TRANSFORMS["skip_nonfinite"]()
    updates, state = ref_tx.update(grads, ref_tx.init(params), params)
    return grads, optax.apply_updates(params, updates), clipchain.stats(state)

  ref_grads, ref_params, ref_stats = jax.jit(reference)(PARAMS, x, y)
  _assert_close(summed, ref_grads, "grads")
  _assert_close(grads, ref_grads, "grads")
  _assert_close(params, ref_params, "params")
  _assert_close(stats, ref_stats, "stats")
  assert stats["clip_by_global_norm/clipped_fraction"] == 1.0


# ---------------------------------------------------------------------------------------------
# jit with FSDP shardings


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=str)
@pytest.mark.parametrize("name", TRANSFORMS)
def test_jit_fsdp(name, axis_type):
  """Sharded arrays under jit, no axis_name: the compiler computes the global norms (an
  all-reduce), the result is the single-device run, and every statistic is replicated."""
  tx = TRANSFORMS[name]()
  mesh = jax.make_mesh((N,), ("fsdp",), axis_types=(axis_type,))
  put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))
  params = jax.tree.map(put, PARAMS, FSDP)
  grads = jax.tree.map(put, GRADS, jax.tree.map(lambda s: P(None, *s), FSDP))
  compiled = jax.jit(lambda p, g: _run(tx, p, g)).lower(params, grads).compile()
  assert "all-reduce" in compiled.as_text()
  updates, stats, params, state = compiled(params, grads)
  for key, value in stats.items():
    assert value.sharding.is_fully_replicated, key
  _assert_same_on_every_device(stats, "stats ")
  ref_updates, ref_stats, ref_params, ref_state = _reference(name)
  _assert_close(updates, ref_updates, "updates")
  _assert_close(stats, ref_stats, "stats")
  _assert_close(params, ref_params, "params")
  _assert_close(state, ref_state, "state")


# ---------------------------------------------------------------------------------------------
# A NaN in one device's shard


@pytest.mark.parametrize("name", [*GUARDS, *GUARDED_STEPS])
def test_nan_in_one_shard_skips_everywhere_shard_map(name):
  """A NaN in one data shard of the dense kernel's second "model" half: after the pmean over
  "data" only the devices of that half hold it, and the guard's norm across "model" makes every
  device skip. Parameters and state equal the run that never saw the batch."""
  grads = _with_nan(SHARES_4, index=(1, NAN_STEP, 20, 30))  # data shard 1, column 30 of 40
  out = _run_shard_map(name, grads, MIXED)
  _assert_same_on_every_device(out, "")
  _, stats, params, state = out
  _, ref_stats, ref_params, ref_state = _reference(name, without_step=NAN_STEP)
  key = f"{GUARDED_STEPS.get(name, name)}/skipped"
  expected = np.insert(np.asarray(ref_stats[key]), NAN_STEP, 1.0)
  np.testing.assert_array_equal(np.asarray(stats[key]), expected)
  _assert_close(params, ref_params, "params")
  _assert_close(state.inner_state, ref_state.inner_state, "state")


@pytest.mark.parametrize("name", [*GUARDS, *GUARDED_STEPS])
def test_nan_in_one_shard_skips_everywhere_pmap(name):
  """Model-parallel pmap, the NaN in device 5's rows: every device skips with axis_name; without
  it only device 5 does, so the devices' optimizer states part."""
  grads = _with_nan(GRADS, (NAN_STEP, 20, 30))  # row 20 of 32: device 5
  _, stats, params, state = _run_model_parallel(name, grads)
  _assert_stacked_identical(stats, "stats ")
  _, ref_stats, ref_params, ref_state = _reference(name, without_step=NAN_STEP)
  key = f"{GUARDED_STEPS.get(name, name)}/skipped"
  expected = np.insert(np.asarray(ref_stats[key]), NAN_STEP, 1.0)
  np.testing.assert_array_equal(np.asarray(stats[key][0]), expected)
  _assert_close(jax.tree.map(_unsplit, params), ref_params, "params")
  _assert_close(_gather_model_parallel(state.inner_state), ref_state.inner_state, "state")

  _, local_stats, _, _ = _run_model_parallel(name, grads, axis_name=None)
  skipped = np.asarray(local_stats[key])[:, NAN_STEP]
  np.testing.assert_array_equal(skipped, np.arange(N) == 5)


# ---------------------------------------------------------------------------------------------
# Units of a shard


def test_unit_shard_of_size_one_along_the_input_axis():
  """A (8, 4) kernel split over 8 devices along its input axis leaves each a (1, 4) shard, which
  the flax layout would take for a vector (one unit) though the kernel has 4: refused, and right
  with ``axis=0``."""
  rng = np.random.default_rng(2)
  params = {"kernel": _dyadic(rng, (N, 4), 1.0), "bias": _dyadic(rng, (N,), 1.0)}
  grads = {"kernel": _dyadic(rng, (N, 4), 1.0), "bias": _dyadic(rng, (N,), 1.0)}
  ref_tx = clipchain.adaptive_grad_clip(0.1)
  ref, _ = ref_tx.update(grads, ref_tx.init(params), params)

  def run(tx):
    step = jax.pmap(lambda g, p: tx.update(g, tx.init(p), p)[0], axis_name="dp")
    return step(jax.tree.map(_split, grads), jax.tree.map(_split, params))

  with pytest.raises(ValueError, match="'kernel' is split across devices"):
    run(clipchain.adaptive_grad_clip(0.1, axis_name="dp"))
  updates = run(clipchain.adaptive_grad_clip(0.1, axis=0, axis_name="dp"))
  _assert_close(jax.tree.map(_unsplit, updates), ref, "updates")
  assert not np.allclose(ref["kernel"], grads["kernel"])

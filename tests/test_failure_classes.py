"""Each class of failure found off the main path, tested for every public transform it concerns.

Silent wrong numbers (complex leaves, array thresholds, unknown mesh axes, groups frozen by a zero
norm, negative thresholds at run time, mislabelled or clashing statistics), crashes in common
set-ups (donation, float64 mode, empty trees, inject_hyperparams, jax.grad), and validation that
names the argument (wrong types, mismatched trees, checkpoints restored into other settings).
"""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from catalog import PRESETS, TRANSFORMS, tree, update
from harness import orbax_round_trip
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import clipchain
from clipchain import thresholds

# Params large enough that AGC leaves small gradients alone.
PARAMS = jax.tree.map(lambda x: 10.0 + x, tree(0))


def run(tx, grads_seq, params=PARAMS, **extra):
  """Eager ``init``, then one jitted update per gradient; the last updates and state."""
  state = tx.init(params)
  step = jax.jit(lambda g, s: update(tx, g, s, params, **extra))
  for grads in grads_seq:
    updates, state = step(grads, state)
  return updates, state


def small(seed=1):
  """Gradients no transform in the catalog clips on its first step."""
  return tree(seed, scale=0.05)


# ---------------------------------------------------------------------------------------------
# 1. Silent wrong numbers


def _norm(x) -> float:
  return float(np.sqrt(np.sum(np.abs(np.asarray(x, np.complex128)) ** 2)))


def _expected(name, grads):
  """What each catalog transform makes of gradients it does not clip."""
  if name.startswith("skip"):
    return jax.tree.map(lambda g: -0.1 * g, grads)
  if name == "normalize":  # the whole tree set to norm 1
    total = np.sqrt(sum(_norm(g) ** 2 for g in jax.tree.leaves(grads)))
    return jax.tree.map(lambda g: g / total, grads)
  if name == "normalize_layer":  # each leaf set to norm 0.5, stabilizer 0.01
    return jax.tree.map(lambda g: g * (0.5 / (_norm(g) + 0.01)), grads)
  if name == "stable_spam_clip":  # first step: nothing above the max; AdaGN sets each leaf to 1
    return jax.tree.map(lambda g: g / _norm(g), grads)
  if name == "clip_by_second_moment":  # RMS is 1 on the first step: Adam's own update
    adam = optax.adam(0.1)
    return adam.update(grads, adam.init(grads))[0]
  return grads


@pytest.mark.parametrize("name", TRANSFORMS)
def test_complex_leaves_keep_their_imaginary_part(name):
  """Nothing is clipped, so every complex value comes out whole (real and imaginary parts)."""
  grads = jax.tree.map(lambda g: (g + 1j * g[..., None].sum(-1) / 2).astype(jnp.complex64), small())
  params = jax.tree.map(lambda p: p.astype(jnp.complex64), PARAMS)
  updates, _ = run(TRANSFORMS[name](), [grads], params)
  # Stable-SPAM's AdaGN divides a moment of the norm by another: a few float32 roundings.
  rtol = 1e-5 if name == "stable_spam_clip" else 1e-6
  chex.assert_trees_all_close(updates, _expected(name, grads), rtol=rtol)
  assert all(jnp.iscomplexobj(u) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize(
  "tx",
  [clipchain.clip(1.0, clip_statistics=True), clipchain.clip_norm(1.0, granularity="element")],
  ids=["clip", "el"],
)
def test_value_clip_of_a_complex_value_clips_the_modulus_and_keeps_the_phase(tx):
  g = {"w": jnp.array([3 + 4j, 0.3 - 0.4j, -2j], jnp.complex64)}
  updates, state = tx.update(g, tx.init(g))
  np.testing.assert_allclose(updates["w"], [0.6 + 0.8j, 0.3 - 0.4j, -1j], rtol=1e-6)
  assert float(state.clipped_fraction) == pytest.approx(2 / 3)


def test_a_schedule_or_policy_returning_an_array_of_the_wrong_shape_is_refused():
  with pytest.raises(ValueError, match=r"max_norm must be a schedule returning a scalar.*\(2,\)"):
    clipchain.clip_by_global_norm(lambda count: jnp.ones(2))

  class Wrong(thresholds.ThresholdPolicy):
    def __call__(self, norms, state, context):
      return jnp.ones(3), state

  tx = clipchain.clip_norm(Wrong(), granularity="layer")
  with pytest.raises(ValueError, match=r"Wrong\(\) returned a threshold shaped \(3,\)"):
    jax.jit(tx.update)(
      {"a": jnp.ones(2), "b": jnp.ones(2)}, tx.init({"a": jnp.ones(2), "b": jnp.ones(2)})
    )


MESH = jax.make_mesh((8,), ("dp",), axis_types=(jax.sharding.AxisType.Auto,))


def _shard_map(fn, *args, out_specs=None):
  out_specs = P() if out_specs is None else out_specs
  return jax.jit(
    jax.shard_map(fn, mesh=MESH, in_specs=P("dp"), out_specs=out_specs, check_vma=True)
  )(*args)


def test_an_axis_name_that_is_not_a_mesh_axis_is_refused():
  grads = {"w": jnp.arange(16.0)}
  for tx in (
    clipchain.clip_by_global_norm(1.0, axis_name="data"),
    clipchain.skip_nonfinite(optax.sgd(0.1), axis_name=("dp", "data")),
  ):

    def step(g, tx=tx):
      return jax.tree.map(jnp.sum, tx.update(g, tx.init(g), g)[0])

    with pytest.raises(ValueError, match=r"axis_name 'data' is not an axis"):
      _shard_map(step, grads)


def test_guards_cannot_decide_differently_on_different_devices():
  """Only device 0's shard holds a NaN. A guard given the axis around a clip without it measures
  the norm itself; a guard without it, judging a split gradient, is refused at trace time."""
  grads = {"w": jnp.arange(16.0).at[1].set(jnp.nan)}
  guarded = clipchain.skip_nonfinite(
    optax.chain(clipchain.clip_by_global_norm(1.0), optax.sgd(0.1)), axis_name="dp"
  )

  def skipped(g):
    _, state = guarded.update(g, guarded.init(g), g)
    return state.skipped[None]

  np.testing.assert_array_equal(_shard_map(skipped, grads, out_specs=P("dp")), [True] * 8)
  unguarded = clipchain.skip_nonfinite(optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"differs between devices along the mesh axes \('dp',\)"):
    _shard_map(lambda g: unguarded.update(g, unguarded.init(g), g)[1].skipped, grads)


def _frozen_then_back(steps_off: int, off: str):
  """Gradients where group ``off`` is exactly 0 for ``steps_off`` steps, then returns at 0.5."""
  seq = []
  for t in range(steps_off + 1):
    g = tree(10 + t, scale=0.3)
    if t < steps_off:
      g = {**g, "dense": {**g["dense"], off: jnp.zeros_like(g["dense"][off])}}
    else:
      g = {**g, "dense": {**g["dense"], off: jnp.full_like(g["dense"][off], 0.5)}}
    seq.append(g)
  return seq


FREEZABLE = [
  (policy, granularity)
  for policy in (
    thresholds.ZScore(warmup_steps=3, max_grad_norm=None),
    thresholds.QuantileTracker(0.5, 0.5, 1.0),
    thresholds.Percentile(10.0, window=4),
    thresholds.EMARatio(ratio=1.1, beta=0.9, warmup_steps=2, warmup_max_norm=None),
  )
  for granularity in ("layer", "unit")
  if not (isinstance(policy, thresholds.Percentile) and granularity == "unit")
]


@pytest.mark.parametrize(
  "policy, granularity", FREEZABLE, ids=[f"{type(p).__name__}-{g}" for p, g in FREEZABLE]
)
def test_a_group_without_gradient_is_not_frozen(policy, granularity):
  """A layer (or the units of a bias) whose gradient is 0 through the warmup and many steps after
  is not clipped to nothing when it comes back: a zero norm never moved its statistics."""
  seq = _frozen_then_back(12, "bias")
  updates, state = run(clipchain.clip_norm(policy, granularity=granularity), seq)
  back = np.asarray(updates["dense"]["bias"])
  assert np.all(back > 0.1), back  # the reference ZClip and quantile tracking give 0 here
  assert np.all(np.isfinite(np.asarray(jax.tree.leaves(state.policy_state)[0])))


def test_quantile_tracker_recovers_from_its_floor():
  """A step far enough below C drives it under the smallest normal float32, where it stops, not at
  0 (0 * exp(x) is 0 for ever); one larger norm then raises it again."""
  tx = clipchain.quantile_clip(0.5, learning_rate=200.0, initial_threshold=1.0)
  _, state = run(tx, [{"w": jnp.full(2, 1e-3)}], params={"w": jnp.zeros(2)})
  floor = float(state.policy_state.quantile)
  assert floor == np.finfo(np.float32).tiny
  _, state = jax.jit(tx.update)({"w": jnp.ones(2)}, state)
  assert float(state.policy_state.quantile) > floor


@pytest.mark.parametrize(
  "make",
  [clipchain.clip, clipchain.clip_by_global_norm, clipchain.clip_by_block_rms],
  ids=lambda f: f.__name__,
)
def test_a_negative_threshold_at_run_time_clips_to_zero_and_never_flips_the_sign(make):
  grads = small()
  scheduled = make(lambda count: -1.0)
  updates, state = run(scheduled, [grads])
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(np.abs(np.asarray(u)), 0.0)
  injected = optax.inject_hyperparams(make)(1.0)
  state = injected.init(grads)
  state.hyperparams[next(iter(state.hyperparams))] = jnp.array(-2.0)
  updates, _ = jax.jit(injected.update)(grads, state)
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(np.abs(np.asarray(u)), 0.0)


def test_statistics_are_labelled_by_layer_name_not_by_shape():
  """A vmapped batch of states whose size equals the number of layers: the per-layer statistics
  of a layer-granularity clip are keyed per layer, a global clip's are not split."""
  grads = {"a": jnp.ones(2), "b": 3 * jnp.ones(2)}
  batch = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), grads)
  for tx, per_layer in (
    (clipchain.zclip(warmup_steps=2, granularity="layer"), True),
    (clipchain.zclip(warmup_steps=2), False),
  ):
    states = jax.vmap(tx.init)(batch)
    # Compiled: op by op, vmap dispatches every primitive of the update on its own.
    _, states = jax.jit(jax.vmap(tx.update))(batch, states)
    stats = clipchain.stats(states)
    if per_layer:
      np.testing.assert_allclose(stats["zclip/mean/a"], [np.sqrt(2), 2 * np.sqrt(2)], rtol=1e-6)
      np.testing.assert_allclose(stats["zclip/mean/b"], [3 * np.sqrt(2), 6 * np.sqrt(2)])
      assert "zclip/mean" not in stats
    else:
      np.testing.assert_allclose(stats["zclip/mean"], [np.sqrt(20), 2 * np.sqrt(20)], rtol=1e-6)
      assert not any(k.startswith("zclip/mean/") for k in stats)


@pytest.mark.parametrize("layers", [None, "module"])
def test_leaves_whose_paths_read_the_same_are_not_merged(layers):
  clash = {"a/b": {"w": jnp.ones(2)}, "a": {"b": {"w": jnp.ones(2)}}}
  tx = clipchain.clip_by_layer_norm(1.0, layers=layers)
  with pytest.raises(ValueError, match=r"both written 'a/b.*rename a key"):
    tx.init(clash)


def test_statistics_that_would_share_a_key_are_refused():
  grads = {"norm": jnp.ones(2)}
  tx = optax.chain(
    clipchain.clip_by_global_norm(1.0, name="c/norm"), clipchain.clip_by_layer_norm(1.0, name="c")
  )
  _, state = tx.update(grads, tx.init(grads))
  with pytest.raises(ValueError, match=r"both named 'c/norm/norm'"):
    clipchain.stats(state)


# ---------------------------------------------------------------------------------------------
# 2. Crashes in common set-ups


def _buffers(state) -> list[int]:
  """The device buffers of every array of ``state``, every shard of a sharded one."""
  return [
    shard.data.unsafe_buffer_pointer()
    for x in jax.tree.leaves(state)
    if isinstance(x, jax.Array)
    for shard in x.addressable_shards
  ]


@pytest.mark.parametrize("name", TRANSFORMS)
def test_eager_init_then_a_donated_step(name):
  """No two fields of an eager ``init`` share a buffer, so a donated step can donate them all;
  also with the params sharded over 8 devices."""
  tx = TRANSFORMS[name]()
  for params in (PARAMS, jax.device_put(PARAMS, NamedSharding(MESH, P()))):
    state = tx.init(params)
    pointers = _buffers(state)
    assert len(pointers) == len(set(pointers)), "init aliases one array into two fields"
    step = jax.jit(lambda g, s, tx=tx, p=params: update(tx, g, s, p), donate_argnums=(1,))
    for seed in range(3):
      updates, state = step(tree(seed), state)
    assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


def _scan_in_dtype(tx, dtype):
  """init, then three updates (one that clips) in one lax.scan; the init and final states."""
  params = jax.tree.map(lambda p: p.astype(dtype), PARAMS)
  scales = jnp.array([0.1, 5.0, 0.2], dtype)
  seq = jax.tree.map(lambda p: scales.reshape((3,) + (1,) * p.ndim) * jnp.ones_like(p), params)

  def step(state, grads):
    updates, state = update(tx, grads, state, params)
    return state, updates

  state = tx.init(params)
  final, updates = jax.jit(lambda s: jax.lax.scan(step, s, seq))(state)
  return params, state, final, updates


@pytest.mark.parametrize("name", TRANSFORMS)
def test_state_dtypes_are_fixed_at_init_in_float64_mode(name):
  """With jax_enable_x64 and float64 (or float32) gradients, an update returns a state of the same
  structure, shapes and dtypes as init, so lax.scan carries it and jit does not retrace."""
  with jax.enable_x64(True):
    for dtype in (jnp.float64, jnp.float32):
      params, state, final, updates = _scan_in_dtype(TRANSFORMS[name](), dtype)
      chex.assert_trees_all_equal_shapes_and_dtypes(final, state)
      chex.assert_trees_all_equal_dtypes(jax.tree.map(lambda u: u[0], updates), params)


def _empty_cases():
  params = {"w": jnp.ones(3), "b": jnp.ones(2)}
  return {
    "empty dict": ({}, lambda tx: tx),
    "all-false mask": (params, lambda tx: optax.masked(tx, {"w": False, "b": False})),
    "empty label": (
      params,
      lambda tx: optax.multi_transform({"x": tx, "y": optax.sgd(0.1)}, {"w": "y", "b": "y"}),
    ),
  }


@pytest.mark.parametrize("case", list(_empty_cases()))
@pytest.mark.parametrize("name", TRANSFORMS)
def test_empty_trees(name, case):
  params, wrap = _empty_cases()[case]
  tx = wrap(TRANSFORMS[name]())
  state = tx.init(params)
  updates, state = jax.jit(lambda g, s: update(tx, g, s, params))(params, state)
  chex.assert_trees_all_equal_structs(updates, params)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
  clipchain.stats(state)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_works_under_inject_hyperparams_with_its_defaults(name):
  """As optax's own transforms: integer and float hyperparameters arrive as arrays, traced in the
  update; the results equal the preset's own."""
  factory, args = PRESETS[name]
  plain, injected = factory(*args), optax.inject_hyperparams(factory)(*args)
  p_state, i_state = plain.init(PARAMS), injected.init(PARAMS)
  step = jax.jit(lambda g, s, tx: tx.update(g, s, PARAMS), static_argnums=2, donate_argnums=1)
  for seed in range(3):
    grads = tree(seed, scale=3.0)
    want, p_state = step(grads, p_state, plain)
    got, i_state = step(grads, i_state, injected)
    chex.assert_trees_all_close(got, want, rtol=1e-6)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_reverse_mode_gradient_through_an_update_is_finite(name):
  """jax.grad of a loss of the updates, after steps that clip, where the forward value is finite."""
  tx = TRANSFORMS[name]()
  state = tx.init(PARAMS)
  for seed in range(3):
    _, state = update(tx, tree(seed, scale=0.5), state, PARAMS)

  def loss(grads):
    updates, _ = update(tx, grads, state, PARAMS)
    return sum(jnp.sum(u * u) for u in jax.tree.leaves(updates))

  value_and_grad = jax.jit(jax.value_and_grad(loss))  # compiled once for the three trees
  for grads in (tree(7, scale=50.0), tree(8, scale=1e-3), jax.tree.map(jnp.zeros_like, PARAMS)):
    value, d = value_and_grad(grads)
    assert np.isfinite(value)
    for leaf in jax.tree.leaves(d):
      assert np.all(np.isfinite(leaf)), (name, leaf)


# ---------------------------------------------------------------------------------------------
# 3. Validation that names the argument


def test_a_factory_instead_of_a_transformation_is_a_type_error():
  for guard in (clipchain.skip_nonfinite, clipchain.skip_spikes):
    with pytest.raises(TypeError, match=r"inner must be an optax.GradientTransformation.*call it"):
      guard(optax.sgd)
    with pytest.raises(TypeError, match=r"inner.*got 3"):
      guard(3)


AXIS_NAME_TAKERS = {
  **{name: lambda kw, f=f, a=a: f(*a, **kw) for name, (f, a) in PRESETS.items()},
  "clip_norm": lambda kw: clipchain.clip_norm(1.0, **kw),
  "skip_nonfinite": lambda kw: clipchain.skip_nonfinite(optax.sgd(0.1), **kw),
  "skip_spikes": lambda kw: clipchain.skip_spikes(optax.sgd(0.1), **kw),
}


@pytest.mark.parametrize("name", AXIS_NAME_TAKERS)
def test_axis_name_of_the_wrong_type_or_value(name):
  build = AXIS_NAME_TAKERS[name]
  with pytest.raises(TypeError, match=r"axis_name.*got 3 of type int"):
    build(dict(axis_name=3))
  with pytest.raises(ValueError, match=r"axis_name.*\('dp', 'dp'\)"):
    build(dict(axis_name=("dp", "dp")))


STRING_HYPERPARAMETERS = [
  (clipchain.adaptive_grad_clip, dict(clipping=0.01, eps="1e-3"), "eps"),
  (clipchain.autoclip, dict(percentile="10"), "percentile"),
  (clipchain.zclip, dict(eps="1e-6"), "eps"),
  (clipchain.zclip, dict(alpha="0.97"), "alpha"),
  (clipchain.zclip, dict(max_grad_norm="1"), "max_grad_norm"),
  (clipchain.quantile_clip, dict(learning_rate="0.2"), "learning_rate"),
  (clipchain.adagc, dict(beta="0.99"), "beta"),
  (clipchain.adagc, dict(eps="1e-6"), "eps"),
  (clipchain.spam_clip, dict(beta2="0.999"), "beta2"),
  (lambda **kw: clipchain.skip_spikes(optax.sgd(0.1), **kw), dict(sigma="6"), "sigma"),
  (lambda **kw: clipchain.skip_spikes(optax.sgd(0.1), **kw), dict(window=8.0), "window"),
]


@pytest.mark.parametrize("factory, kwargs, argname", STRING_HYPERPARAMETERS)
def test_hyperparameters_of_the_wrong_type_fail_at_construction(factory, kwargs, argname):
  value = kwargs[argname]
  with pytest.raises(TypeError, match=rf"{argname}.*{re.escape(repr(value))}"):
    factory(**kwargs)


@pytest.mark.parametrize("name", [n for n in TRANSFORMS if not n.startswith("skip")])
def test_update_on_another_tree_than_init_says_what_differs(name):
  tx = TRANSFORMS[name]()
  state = tx.init(PARAMS)
  missing = {"dense": PARAMS["dense"]}
  extra = {**PARAMS, "head": jnp.ones(2)}
  reshaped = {**PARAMS, "scale": jnp.ones(3)}
  for grads, message in (
    (missing, r"leaves missing from the updates: \['scale'\]"),
    (extra, r"leaves not in the tree given to init: \['head'\]"),
    (reshaped, r"shapes changed: \['scale: \(\) -> \(3,\)'\]"),
  ):
    with pytest.raises(ValueError, match=message):
      jax.jit(lambda g, s, p: tx.update(g, s, p))(grads, state, grads)


def test_a_checkpoint_restored_into_other_settings_is_refused(tmp_path):
  """The state records what its arrays mean; Orbax refuses a target that means something else."""
  params = {"dense": {"w": jnp.ones(2)}, "head": {"w": jnp.ones(2)}}
  cases = [
    (
      clipchain.skip_spikes(optax.sgd(0.1), watch=("grad_norm",)),
      clipchain.skip_spikes(optax.sgd(0.1), watch=("loss",)),
      "watch_grad_norm",
    ),
    (
      clipchain.clip_by_layer_norm(1.0, layers={"body": "dense", "out": "head"}),
      clipchain.clip_by_layer_norm(1.0, layers={"trunk": "dense", "out": "head"}),
      "Fixed_groups_",
    ),
    (
      clipchain.adaptive_grad_clip(0.1, axis=0),
      clipchain.zclip(granularity="unit"),
      "RelativeToParams_groups_",
    ),
  ]
  for i, (saved, other, key) in enumerate(cases):
    state = saved.init(params)
    with pytest.raises(ValueError, match=rf"do not match[\s\S]*{key}"):
      orbax_round_trip(tmp_path / str(i), state, like=other.init(params))
    restored = orbax_round_trip(tmp_path / f"same{i}", state, like=saved.init(params))
    chex.assert_trees_all_equal(restored, state)


# ---------------------------------------------------------------------------------------------
# Found by probing as an adversarial user: each a case of the classes above.


def test_a_nan_or_negative_hyperparameter_injected_for_one_step_leaves_no_trace():
  """A NaN hyperparameter for one step must not poison a policy's state for good, and SPAM's
  threshold turning negative clips to zero like any negative threshold."""
  grads = {"w": jnp.array([3.0, -4.0])}
  cases = [
    (clipchain.zclip, dict(max_grad_norm=None, warmup_steps=2), "alpha", jnp.nan),
    (clipchain.quantile_clip, dict(initial_threshold=1.0), "learning_rate", jnp.nan),
    (clipchain.spam_clip, dict(warmup_steps=0), "threshold", -1.0),
  ]
  for factory, kwargs, hyperparameter, bad in cases:
    tx = optax.inject_hyperparams(factory)(**kwargs)
    state = tx.init(grads)
    step = jax.jit(tx.update)
    good = state.hyperparams[hyperparameter]
    for scale, value in ((1.0, good), (1.1, good), (1.0, bad), (1.0, good), (100.0, good)):
      state.hyperparams[hyperparameter] = jnp.asarray(value)
      updates, state = step(jax.tree.map(lambda g, s=scale: s * g, grads), state)
      for leaf in jax.tree.leaves(state.inner_state.policy_state):
        assert not np.any(np.isnan(np.asarray(leaf))), (factory.__name__, leaf)
      if factory is clipchain.spam_clip and value is bad:
        np.testing.assert_array_equal(np.abs(updates["w"]), 0.0)
    # The policy still works: the 100x spike at the end is clipped.
    assert float(optax.tree.norm(updates)) < 100.0, factory.__name__


def test_params_shaped_unlike_the_updates_are_refused():
  grads = {"w": jnp.ones((2, 2))}
  for tx in (
    clipchain.adaptive_grad_clip(0.1),
    clipchain.clip_norm(thresholds.RelativeToParams(0.1), granularity="global"),
  ):
    state = tx.init(grads)
    with pytest.raises(ValueError, match=r"params are not shaped like.*\(2, 2\) -> \(50, 2\)"):
      tx.update(grads, state, {"w": jnp.ones((50, 2))})
    with pytest.raises(ValueError, match=r"params are not shaped like.*missing"):
      tx.update(grads, state, {"x": jnp.ones(7)})
    with pytest.raises(
      ValueError, match=r"needs the params: call tx.update\(updates, state, params"
    ):
      tx.update(grads, state)


def test_a_policy_statistic_may_not_take_the_name_of_the_cores():
  class Shadowing(thresholds.ThresholdPolicy):
    def __call__(self, norms, state, context):
      return 1.0, state

    def statistics(self, state):
      return {"norm": jnp.zeros(())}

  tx = clipchain.clip_norm(Shadowing(), name="c")
  with pytest.raises(ValueError, match=r"statistics named \['norm'\], which c reports itself"):
    tx.init({"w": jnp.ones(2)})


def test_bfloat16_hyperparameters_are_numbers():
  grads = {"w": jnp.array([3.0, 4.0], jnp.bfloat16)}
  for factory, kwargs in (
    (clipchain.clip_by_global_norm, dict(max_norm=1.0)),
    (clipchain.zclip, {}),
  ):
    tx = optax.inject_hyperparams(factory, hyperparam_dtype=jnp.bfloat16)(**kwargs)
    updates, _ = jax.jit(tx.update)(grads, tx.init(grads))
    assert updates["w"].dtype == jnp.bfloat16
  clipchain.clip_by_global_norm(jnp.asarray(1.0, jnp.bfloat16))


@pytest.mark.parametrize(
  "build, argname",
  [
    (lambda: clipchain.zclip(warmup_steps=2**31), "warmup_steps"),
    (lambda: clipchain.zclip(z_thresh=2**40), "z_thresh"),
    (lambda: clipchain.spam_clip(threshold=2**40), "threshold"),
    (lambda: clipchain.skip_nonfinite(optax.sgd(1.0), max_consecutive=2**31), "max_consecutive"),
    (lambda: clipchain.autoclip(window=2**40), "window"),
    (lambda: clipchain.zclip(warmup_steps=np.array([1, 2])), "warmup_steps"),
    (lambda: clipchain.skip_spikes(optax.sgd(1.0), window=np.array([4, 8])), "window"),
  ],
)
def test_integers_out_of_int32_or_arrays_of_integers_are_bad_values(build, argname):
  with pytest.raises(ValueError, match=argname):
    build()


def test_a_changed_container_is_said_to_differ():
  tx = clipchain.spam_clip(warmup_steps=0)
  for init_tree, update_tree in (
    ([jnp.ones(2), jnp.ones(3)], (jnp.ones(2), jnp.ones(3))),
    ({"0": jnp.ones(2)}, {0: jnp.ones(2)}),
  ):
    state = tx.init(init_tree)
    with pytest.raises(ValueError, match=r"spam_clip: the updates .*the same leaves in other"):
      tx.update(update_tree, state)


def test_a_transformation_factory_is_not_a_schedule():
  with pytest.raises(TypeError, match=r"max_norm must be a number or a schedule"):
    clipchain.clip_by_global_norm(optax.sgd)
  with pytest.raises(TypeError, match=r"ratio must be a number or a schedule"):
    clipchain.adagc(ratio=optax.sgd)
  with pytest.raises(ValueError, match=r"max_norm must be a schedule returning a scalar"):
    clipchain.clip_by_global_norm(lambda count: jnp.ones(2))


def test_boxed_linen_params_are_grouped_by_their_module():
  """nn.Partitioned leaves are named without their box's ``value`` key, as NNX Variables are."""
  from flax import linen as nn

  boxed = {
    "params": {
      "enc": {
        "kernel": nn.Partitioned(jnp.ones((3, 2)), (None, "model")),
        "bias": nn.Partitioned(jnp.ones(2), ("model",)),
      }
    }
  }
  tx = clipchain.clip_by_layer_norm(1.0, layers="module", name="c")
  _, state = tx.update(boxed, tx.init(boxed))
  assert state.layer_names == ("params/enc",)
  np.testing.assert_allclose(float(state.clipped_norm), 1.0, rtol=1e-6)
  by_regex = clipchain.clip_by_layer_norm(1.0, layers={"k": r"kernel$", "b": r"bias$"})
  assert by_regex.init(boxed).layer_names == ("b", "k")


class _Returns(thresholds.ThresholdPolicy):
  """A policy returning whatever ``make(norms)`` builds."""

  def __init__(self, make):
    object.__setattr__(self, "make", make)

  def __call__(self, norms, state, context):
    return self.make(norms), state


def test_a_threshold_that_broadcasts_to_the_norms_is_recorded_in_their_shape():
  params = {"a": jnp.ones(2), "b": jnp.ones(2), "c": jnp.ones(2)}
  tx = clipchain.clip_norm(_Returns(lambda n: jnp.ones((1,))), granularity="layer", name="c")
  state = tx.init(params)
  final, _ = jax.lax.scan(lambda s, _: (tx.update(params, s)[1], None), state, None, length=2)
  assert final.threshold.shape == (3,)
  units = {"a": jnp.ones((2, 1)), "b": jnp.ones((2, 99))}
  per_leaf = _Returns(lambda n: jax.tree.map(lambda x: jnp.where(x.size == 1, 1.0, 3.0), n))
  tx = clipchain.clip_norm(per_leaf, granularity="unit", name="u")
  _, state = tx.update(units, tx.init(units))
  np.testing.assert_allclose(float(clipchain.stats(state)["u/threshold"]), 2.98, rtol=1e-6)


def test_a_threshold_tree_where_the_norms_are_one_array_is_refused():
  params = {"w": jnp.ones(2), "b": jnp.ones(2)}
  tx = clipchain.clip_norm(_Returns(lambda n: {"w": 1.0, "b": 1.0}), granularity="global")
  with pytest.raises(ValueError, match=r"returned a threshold shaped .*must be a scalar or shaped"):
    tx.update(params, tx.init(params))


def test_groups_named_otherwise_than_at_init_are_refused():
  tx = clipchain.clip_by_layer_norm(1.0)
  state = tx.init({"enc": jnp.ones(2), "dec": jnp.ones(2)})
  renamed = state._replace(layer_names=("x", "y"))
  with pytest.raises(ValueError, match=r"names the groups \['dec', 'enc'\] now and \['x', 'y'\]"):
    tx.update({"enc": jnp.ones(2), "dec": jnp.ones(2)}, renamed)

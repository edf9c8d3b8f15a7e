"""Integration: every clipchain transform composes with optax, JAX transformations, Flax and Orbax.

Each result is checked against clipping by hand (``clip_reference``, NumPy in float64).
"""

from __future__ import annotations

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from clip_reference import clip_leaves
from flax import nnx
from flax.training import train_state
from harness import TransformCase, at, normal_tree, orbax_round_trip, parametrize_cases

import clipchain

LR = 0.1


@dataclasses.dataclass(frozen=True)
class Case(TransformCase):
  """A transform and how to clip by hand what it clips."""

  kind: str
  threshold: float
  leaf_layer: tuple[int, ...] | None = None

  def reference(self, tree):
    leaves, treedef = jax.tree.flatten(tree)
    out, stats = clip_leaves(leaves, self.kind, self.threshold, self.leaf_layer)
    return jax.tree.unflatten(treedef, [jnp.asarray(x, jnp.float32) for x in out]), stats


# Thresholds sit away from the norms of both the raw gradients and Adam's ~±1 outputs, so that no
# group is within rounding of its threshold, and every case clips some groups at every step.
CASES = [
  Case("clip", lambda: clipchain.clip(0.8, clip_statistics=True), "element", 0.8),
  Case("clip_by_global_norm", lambda: clipchain.clip_by_global_norm(2.5), "global", 2.5),
  Case("clip_by_block_rms", lambda: clipchain.clip_by_block_rms(0.6), "rms", 0.6),
  Case("clip_by_layer_norm", lambda: clipchain.clip_by_layer_norm(1.7), "layer", 1.7),
  Case(
    "clip_by_layer_norm_module",
    lambda: clipchain.clip_by_layer_norm(2.2, layers="module"),
    "layer",
    2.2,
    (0, 0, 1),
  ),
  Case("clip_norm_global", lambda: clipchain.clip_norm(2.5, granularity="global"), "global", 2.5),
  Case("clip_norm_layer", lambda: clipchain.clip_norm(1.7, granularity="layer"), "layer", 1.7),
  Case("clip_norm_unit", lambda: clipchain.clip_norm(1.5, granularity="unit"), "unit", 1.5),
  Case(
    "clip_norm_element", lambda: clipchain.clip_norm(0.8, granularity="element"), "element", 0.8
  ),
]
CASE_BY_ID = {case.id: case for case in CASES}
all_cases = parametrize_cases(CASES)
SHAPES = {"dense": {"kernel": (3, 4), "bias": (4,)}, "out": {"kernel": (4, 2)}}


def make_tree(seed: int, batch: tuple[int, ...] = (), scale: float = 1.0):
  """In leaf order: dense/bias (4,), dense/kernel (3, 4), out/kernel (4, 2)."""
  return normal_tree(SHAPES, seed, scale, batch)


def zeros_like_tree():
  return jax.tree.map(jnp.zeros_like, make_tree(0))


def assert_close(actual, expected, rtol=2e-5, atol=1e-6):
  chex.assert_trees_all_close(actual, expected, rtol=rtol, atol=atol)


def assert_stats_match(state, reference_stats):
  """The (first) clipchain state in ``state`` reports the reference norms and clipped fraction."""
  stats = clipchain.stats(state)
  name = next(iter(stats)).split("/")[0]
  np.testing.assert_allclose(stats[f"{name}/norm"], reference_stats["norm"], rtol=2e-5)
  np.testing.assert_allclose(
    stats[f"{name}/clipped_norm"], reference_stats["clipped_norm"], rtol=2e-5
  )
  np.testing.assert_allclose(
    stats[f"{name}/clipped_fraction"], reference_stats["clipped_fraction"], rtol=1e-6
  )


@all_cases
def test_fixture_clips_some_groups(case):
  """The thresholds are meaningful: each case clips something on both kinds of input."""
  _, raw = case.reference(make_tree(1))
  adam_like = jax.tree.map(jnp.sign, make_tree(1))
  _, normalised = case.reference(adam_like)
  for stats in (raw, normalised):
    assert stats["clipped_fraction"] > 0
    assert stats["clipped_norm"] < stats["norm"]


@all_cases
def test_before_optimizer(case):
  """``chain(clip, adam)`` equals Adam on gradients clipped by hand, over three steps."""
  tx = optax.chain(case.make(), optax.adam(LR))
  reference = optax.adam(LR)
  params = zeros_like_tree()
  state, ref_state = tx.init(params), reference.init(params)
  unclipped = optax.adam(LR)
  unclipped_state = unclipped.init(params)
  differs = False
  for step in range(3):
    grads = make_tree(step, scale=1.0 + step)
    updates, state = tx.update(grads, state, params)
    clipped, ref_stats = case.reference(grads)
    expected, ref_state = reference.update(clipped, ref_state, params)
    assert_close(updates, expected)
    assert_stats_match(state, ref_stats)
    plain, unclipped_state = unclipped.update(grads, unclipped_state, params)
    differs |= not np.allclose(jax.tree.leaves(plain)[1], jax.tree.leaves(updates)[1], rtol=1e-3)
    params = optax.apply_updates(params, updates)
  assert differs, "clipping had no effect on Adam's updates: the test has no power"


@all_cases
def test_after_optimizer(case):
  """``chain(scale_by_adam(), clip, scale(-lr))`` clips Adam's direction, as by hand."""
  tx = optax.chain(optax.scale_by_adam(), case.make(), optax.scale(-LR))
  adam = optax.scale_by_adam()
  params = zeros_like_tree()
  state, adam_state = tx.init(params), adam.init(params)
  for step in range(2):
    grads = make_tree(10 + step)
    updates, state = tx.update(grads, state, params)
    direction, adam_state = adam.update(grads, adam_state, params)
    clipped, ref_stats = case.reference(direction)
    assert_close(updates, jax.tree.map(lambda x: -LR * x, clipped))
    assert_stats_match(state, ref_stats)
    params = optax.apply_updates(params, updates)


@all_cases
def test_jit(case):
  """The jitted update equals the reference, and the eager update, for two steps."""
  tx = case.make()
  update = jax.jit(tx.update)
  state = eager_state = tx.init(zeros_like_tree())
  for step in range(2):
    grads = make_tree(20 + step, scale=1.0 + step)
    updates, state = update(grads, state)
    eager_updates, eager_state = tx.update(grads, eager_state)
    clipped, ref_stats = case.reference(grads)
    assert_close(updates, clipped)
    assert_close(updates, eager_updates, rtol=1e-6)
    assert_stats_match(state, ref_stats)
  assert int(state.count) == 2


@all_cases
def test_vmap(case):
  """``vmap`` over a batch of independent (update, state) pairs clips each pair on its own."""
  batch = 3
  tx = case.make()
  states = jax.vmap(tx.init)(make_tree(0, batch=(batch,)))
  grads = make_tree(30, batch=(batch,))
  grads = jax.tree.map(
    lambda x: x * jnp.arange(1.0, batch + 1.0).reshape((-1,) + (1,) * (x.ndim - 1)), grads
  )
  # Compiled: op by op, vmap dispatches every primitive of the update on its own.
  updates, states = jax.jit(jax.vmap(tx.update))(grads, states)
  assert states.count.shape == (batch,)
  assert states.name == tx.init(make_tree(0)).name
  stats = clipchain.stats(states)
  for b in range(batch):
    clipped, ref_stats = case.reference(at(grads, b))
    assert_close(at(updates, b), clipped)
    for key in ("norm", "clipped_norm", "clipped_fraction"):
      value = next(v for k, v in stats.items() if k.endswith(f"/{key}"))
      assert value.shape == (batch,)
      np.testing.assert_allclose(value[b], ref_stats[key], rtol=2e-5)


def clip_with_statistics(max_delta):
  """The value clip with its clipped norm and fraction, which the reference checks."""
  return clipchain.clip(max_delta, clip_statistics=True)


INJECTABLE = [
  (clip_with_statistics, "max_delta", "element", 0.8, 0.3),
  (clipchain.clip_by_global_norm, "max_norm", "global", 1.0, 2.0),
  (clipchain.clip_by_block_rms, "threshold", "rms", 0.9, 0.4),
  (clipchain.clip_by_layer_norm, "max_norm", "layer", 2.2, 1.0),
]


@pytest.mark.parametrize(
  "factory,argname,kind,first,second", INJECTABLE, ids=[f[0].__name__ for f in INJECTABLE]
)
def test_inject_hyperparams(factory, argname, kind, first, second):
  """The injected threshold is used, and changing it in the state takes effect next step."""
  tx = optax.inject_hyperparams(factory)(**{argname: first})
  update = jax.jit(tx.update)
  state = tx.init(zeros_like_tree())
  grads = make_tree(40)
  updates, state = update(grads, state)
  assert_close(updates, Case("", None, kind, first).reference(grads)[0])
  state.hyperparams[argname] = jnp.asarray(second)
  updates, state = update(grads, state)
  expected, ref_stats = Case("", None, kind, second).reference(grads)
  assert_close(updates, expected)
  assert_stats_match(state, ref_stats)


@all_cases
def test_masked(case):
  """Under ``optax.masked`` only masked leaves are clipped; the others pass through untouched."""
  mask = {"dense": {"kernel": True, "bias": False}, "out": {"kernel": True}}
  tx = optax.masked(case.make(), mask)
  grads = make_tree(50, scale=3.0)
  updates, state = tx.update(grads, tx.init(zeros_like_tree()))
  np.testing.assert_array_equal(updates["dense"]["bias"], grads["dense"]["bias"])
  masked_case = dataclasses.replace(case, leaf_layer=None if case.leaf_layer is None else (0, 1))
  clipped, ref_stats = masked_case.reference([grads["dense"]["kernel"], grads["out"]["kernel"]])
  assert_close([updates["dense"]["kernel"], updates["out"]["kernel"]], clipped)
  assert_stats_match(state, ref_stats)


@pytest.mark.parametrize("case_id", ["clip_by_global_norm", "clip_by_layer_norm", "clip"])
def test_multi_steps(case_id):
  """``MultiSteps`` clips the mean of k micro-gradients once per optimizer step."""
  case, k = CASE_BY_ID[case_id], 3
  tx = optax.MultiSteps(optax.chain(case.make(), optax.sgd(LR)), every_k_schedule=k)
  update = jax.jit(tx.update)
  params = zeros_like_tree()
  state = tx.init(params)
  micro = []
  for step in range(2 * k):
    grads = make_tree(60 + step, scale=2.0)
    micro.append(grads)
    updates, state = update(grads, state, params)
    clip_state = state.inner_opt_state[0]
    if (step + 1) % k:
      chex.assert_trees_all_equal(updates, zeros_like_tree())
      assert int(clip_state.count) == step // k
      if step < k:
        assert float(clipchain.stats(state)[f"{clip_state.name}/norm"]) == 0.0
    else:
      mean = jax.tree.map(lambda *g: sum(g) / k, *micro[-k:])
      clipped, ref_stats = case.reference(mean)
      assert_close(updates, jax.tree.map(lambda x: -LR * x, clipped))
      assert int(clip_state.count) == (step + 1) // k
      assert_stats_match(state, ref_stats)
    params = optax.apply_updates(params, updates)


@pytest.mark.parametrize("granularity", ["global", "element"])
def test_schedule_threshold(granularity):
  """A schedule threshold follows the update count: 4, 3, 2, 1, 1."""
  schedule = optax.linear_schedule(4.0, 1.0, transition_steps=3)
  tx = clipchain.clip_norm(schedule, granularity=granularity, name="sched")
  update = jax.jit(tx.update)
  grads = {"w": jnp.array([30.0, -40.0])}
  state = tx.init(grads)
  for step, expected_threshold in enumerate([4.0, 3.0, 2.0, 1.0, 1.0]):
    updates, state = update(grads, state)
    stats = clipchain.stats(state)
    np.testing.assert_allclose(stats["sched/threshold"], expected_threshold, rtol=1e-6)
    expected, _ = Case("", None, granularity, expected_threshold).reference(grads)
    assert_close(updates, expected)
    assert int(state.count) == step + 1


@pytest.mark.parametrize("case_id", ["clip_by_global_norm", "clip_by_layer_norm_module"])
def test_scan(case_id):
  """``lax.scan`` with (params, state) as carry equals a NumPy SGD loop on clipped gradients."""
  case, steps = CASE_BY_ID[case_id], 4
  tx = optax.chain(case.make(), optax.sgd(LR))
  params = make_tree(70)
  grads = make_tree(71, batch=(steps,), scale=2.0)

  def step(carry, g):
    p, s = carry
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), clipchain.stats(s)

  (final, state), history = jax.lax.scan(step, (params, tx.init(params)), grads)
  expected = [np.asarray(x, np.float64) for x in jax.tree.leaves(params)]
  for t in range(steps):
    clipped, ref_stats = clip_leaves(
      [x[t] for x in jax.tree.leaves(grads)], case.kind, case.threshold, case.leaf_layer
    )
    expected = [p - LR * c for p, c in zip(expected, clipped)]
    name = state[0].name
    np.testing.assert_allclose(history[f"{name}/norm"][t], ref_stats["norm"], rtol=2e-5)
    np.testing.assert_allclose(
      history[f"{name}/clipped_norm"][t], ref_stats["clipped_norm"], rtol=2e-5
    )
  assert_close(jax.tree.leaves(final), expected, rtol=1e-5, atol=1e-5)
  assert int(state[0].count) == steps


# Flax.


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2)(jax.nn.relu(nn.Dense(4)(x)))


class NnxMLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(3, 4, rngs=rngs)
    self.l2 = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.l2(jax.nn.relu(self.l1(x)))


def regression_data():
  rng = np.random.default_rng(80)
  x = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)
  return x, y


FLAX_CASES = [
  ("global", lambda: clipchain.clip_by_global_norm(0.2), "global", 0.2),
  ("module", lambda: clipchain.clip_by_layer_norm(0.2, layers="module"), "layer", 0.2),
  ("unit", lambda: clipchain.clip_norm(0.1, granularity="unit"), "unit", 0.1),
]
flax_cases = pytest.mark.parametrize(
  "make,kind,threshold", [c[1:] for c in FLAX_CASES], ids=[c[0] for c in FLAX_CASES]
)


def module_layers(paths: list[str]) -> tuple[int, ...]:
  """The layer index of each leaf when leaves are grouped by their parent path."""
  parents = [p.rsplit("/", 1)[0] for p in paths]
  order = list(dict.fromkeys(parents))
  return tuple(order.index(p) for p in parents)


@flax_cases
def test_flax_linen_train_state(make, kind, threshold):
  """A linen ``TrainState`` trained with a clipchain chain takes the hand-clipped Adam steps."""
  model = LinenMLP()
  x, y = regression_data()
  variables = model.init(jax.random.key(0), x)
  state = train_state.TrainState.create(
    apply_fn=model.apply, params=variables, tx=optax.chain(make(), optax.adam(LR))
  )

  def loss(params):
    return jnp.mean((state.apply_fn(params, x) - y) ** 2)

  @jax.jit
  def train_step(state):
    grads = jax.grad(loss)(state.params)
    return state.apply_gradients(grads=grads), grads, clipchain.stats(state.opt_state)

  paths = [
    jax.tree_util.keystr(p, simple=True, separator="/")
    for p, _ in jax.tree_util.tree_flatten_with_path(variables)[0]
  ]
  leaf_layer = module_layers(paths) if kind == "layer" else None
  reference = optax.adam(LR)
  ref_params, ref_state = variables, reference.init(variables)
  for _ in range(2):
    state, grads, _ = train_step(state)
    clipped, ref_stats = Case("", None, kind, threshold, leaf_layer).reference(grads)
    assert ref_stats["clipped_fraction"] > 0
    updates, ref_state = reference.update(clipped, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, updates)
    assert_close(state.params, ref_params, rtol=1e-5, atol=1e-6)
    assert_stats_match(state.opt_state, ref_stats)
  clip_state = state.opt_state[0]
  assert int(clip_state.count) == 2
  if kind == "layer":
    assert clip_state.layer_names == ("params/Dense_0", "params/Dense_1")
    stats = clipchain.stats(state.opt_state)
    for i, layer in enumerate(clip_state.layer_names):
      np.testing.assert_allclose(
        stats[f"clip_by_layer_norm/norm/{layer}"], ref_stats["layer_norms"][i], rtol=2e-5
      )


@flax_cases
def test_flax_nnx_optimizer(make, kind, threshold):
  """``nnx.Optimizer`` with a clipchain chain takes the hand-clipped Adam steps."""
  model = NnxMLP(nnx.Rngs(0))
  x, y = regression_data()
  optimizer = nnx.Optimizer(model, optax.chain(make(), optax.adam(LR)), wrt=nnx.Param)

  def loss(model):
    return jnp.mean((model(x) - y) ** 2)

  # Leaves of nnx.state are Variables; grouping must name them by the Variable's path.
  paths = ["l1/bias", "l1/kernel", "l2/bias", "l2/kernel"]
  leaf_layer = module_layers(paths) if kind == "layer" else None
  reference = optax.adam(LR)
  ref_params = jax.tree.leaves(nnx.state(model, nnx.Param))
  ref_state = reference.init(ref_params)
  for _ in range(2):
    grads = nnx.grad(loss)(model)
    optimizer.update(model, grads)
    clipped, ref_stats = Case("", None, kind, threshold, leaf_layer).reference(grads)
    assert ref_stats["clipped_fraction"] > 0
    updates, ref_state = reference.update(jax.tree.leaves(clipped), ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, updates)
    assert_close(jax.tree.leaves(nnx.state(model, nnx.Param)), ref_params, rtol=1e-5, atol=1e-6)
    pure = nnx.as_pure(optimizer.opt_state)
    assert_stats_match(pure, ref_stats)
  clip_state = nnx.as_pure(optimizer.opt_state)[0]
  assert int(clip_state.count) == 2
  # stats() on the raw, Variable-wrapped optimizer state returns plain arrays too.
  assert all(isinstance(v, jax.Array) for v in clipchain.stats(optimizer.opt_state).values())
  if kind == "layer":
    assert clip_state.layer_names == ("l1", "l2")
    stats = clipchain.stats(nnx.as_pure(optimizer.opt_state))
    assert set(stats) >= {"clip_by_layer_norm/norm/l1", "clip_by_layer_norm/norm/l2"}
    for i, layer in enumerate(clip_state.layer_names):
      np.testing.assert_allclose(
        stats[f"clip_by_layer_norm/norm/{layer}"], ref_stats["layer_norms"][i], rtol=2e-5
      )
      # The raw optimizer state (Variable-wrapped) gives the same numbers.
      raw = clipchain.stats(optimizer.opt_state)[f"clip_by_layer_norm/norm/{layer}"]
      assert float(raw) == float(stats[f"clip_by_layer_norm/norm/{layer}"])


def test_nnx_per_leaf_layer_names():
  """Per-leaf layer names of an nnx model are the Variables' paths, without a ``value`` suffix."""
  model = NnxMLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, clipchain.clip_by_layer_norm(1.0), wrt=nnx.Param)
  names = nnx.as_pure(optimizer.opt_state).layer_names
  assert names == ("l1/bias", "l1/kernel", "l2/bias", "l2/kernel")
  x, y = regression_data()
  grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
  optimizer.update(model, grads)
  stats = clipchain.stats(nnx.as_pure(optimizer.opt_state))
  expected = [np.linalg.norm(np.asarray(g)) for g in jax.tree.leaves(grads)]
  for name, value in zip(names, expected):
    np.testing.assert_allclose(stats[f"clip_by_layer_norm/norm/{name}"], value, rtol=2e-5)


# Orbax.


def test_orbax_round_trip(tmp_path):
  """A state holding several clipchain states restores bit-exactly, static fields included."""
  tx = optax.chain(
    clipchain.clip_by_global_norm(1.0, name="gclip"),
    clipchain.clip_by_layer_norm({"dense": 2.0, "out": 1.0}, layers="module"),
    clipchain.clip_norm(0.5, granularity="unit"),
    optax.inject_hyperparams(clipchain.clip)(max_delta=0.1),
    optax.adam(LR),
  )
  params = zeros_like_tree()
  state = tx.init(params)
  for step in range(2):
    _, state = tx.update(make_tree(90 + step, scale=3.0), state, params)

  restored = orbax_round_trip(tmp_path / "state", state, tx.init(params))

  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)
  assert restored[0].name == "gclip"
  assert restored[1].layer_names == ("dense", "out")
  assert isinstance(restored[0], clipchain.ClipNormState)
  stats, restored_stats = clipchain.stats(state), clipchain.stats(restored)
  assert set(restored_stats) == set(stats)
  assert "gclip/norm" in restored_stats and "clip_by_layer_norm/norm/dense" in restored_stats
  grads = make_tree(99, scale=3.0)
  chex.assert_trees_all_equal(tx.update(grads, restored, params), tx.update(grads, state, params))

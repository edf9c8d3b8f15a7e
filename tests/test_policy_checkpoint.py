"""The state of every adaptive preset: Orbax, non-finite steps, fixed shapes, stats, vmap, scan.

Each case is the preset chained before Adam, driven by one deterministic sequence of Flax-shaped
gradients with a few 30x spikes, so that adaptive thresholds move and clip.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from harness import (
  TransformCase,
  assert_bits_equal,
  at,
  loop,
  normal_tree,
  orbax_round_trip,
  parametrize_cases,
  scan,
  unstack,
)

import clipchain

STEPS = 12
SPIKES = (5, 9)
BATCH = 3


@dataclasses.dataclass(frozen=True)
class Case(TransformCase):
  """A clipping transform, the name it reports under and how its threshold is keyed in stats."""

  name: str
  per_layer: bool = False
  stateful: bool = True


CASES = [
  Case("agc", lambda: clipchain.adaptive_grad_clip(0.05), "adaptive_grad_clip", stateful=False),
  Case("autoclip", lambda: clipchain.autoclip(), "autoclip"),
  Case(
    "autoclip_package",
    lambda: clipchain.autoclip(90.0, window=5, include_current=False),
    "autoclip",
  ),
  Case(
    "autoclip_layer",
    lambda: clipchain.autoclip(window=8, granularity="layer"),
    "autoclip",
    per_layer=True,
  ),
  Case("zclip", lambda: clipchain.zclip(warmup_steps=3), "zclip"),
  Case(
    "zclip_percentile_skip",
    lambda: clipchain.zclip(
      warmup_steps=3, mode="percentile", max_grad_norm=None, skip_update_on_spike=True
    ),
    "zclip",
  ),
  Case(
    "zclip_layer",
    lambda: clipchain.zclip(warmup_steps=3, granularity="layer"),
    "zclip",
    per_layer=True,
  ),
  Case("quantile_clip", lambda: clipchain.quantile_clip(), "quantile_clip"),
  Case(
    "quantile_clip_layer",
    lambda: clipchain.quantile_clip(granularity="layer"),
    "quantile_clip",
    per_layer=True,
  ),
  Case("adagc", lambda: clipchain.adagc(warmup_steps=3), "adagc", per_layer=True),
  Case(
    "adagc_module",
    lambda: clipchain.adagc(warmup_steps=3, granularity=clipchain.granularity.Layer("module")),
    "adagc",
    per_layer=True,
  ),
  Case(
    "adagc_global",
    lambda: clipchain.clip_norm(
      clipchain.thresholds.EMARatio(warmup_steps=3), granularity="global", name="adagc_global"
    ),
    "adagc_global",
  ),
  Case("spam_clip", lambda: clipchain.spam_clip(warmup_steps=3, clip_statistics=True), "spam_clip"),
  # Per output unit, where each policy keeps a tuple of per-leaf statistics.
  Case("zclip_unit", lambda: clipchain.zclip(warmup_steps=3, granularity="unit"), "zclip"),
  Case("quantile_clip_unit", lambda: clipchain.quantile_clip(granularity="unit"), "quantile_clip"),
  Case(
    "adagc_unit",
    lambda: clipchain.clip_norm(
      clipchain.thresholds.EMARatio(warmup_steps=3), granularity="unit", name="adagc_unit"
    ),
    "adagc_unit",
  ),
]
all_cases = parametrize_cases(CASES)
PARAM_SHAPES = {
  "params": {
    "Dense_0": {"kernel": (4, 8), "bias": (8,)},
    "Dense_1": {"kernel": (8, 3), "bias": (3,)},
  }
}


def make_params():
  return normal_tree(PARAM_SHAPES, 0)


def make_grads(seed: int, steps: int = STEPS, batch: tuple[int, ...] = ()):
  """``steps`` gradient trees stacked on a leading axis; steps in ``SPIKES`` are 30x larger."""
  rng = np.random.default_rng(seed)
  scale = np.ones(steps)
  scale[[s for s in SPIKES if s < steps]] = 30.0
  scale = scale.reshape((steps,) + (1,) * len(batch))

  def leaf(x):
    shape = (steps, *batch, *x.shape)
    values = 0.1 * rng.normal(size=shape) * scale.reshape(scale.shape + (1,) * x.ndim)
    return jnp.asarray(values, jnp.float32)

  return jax.tree.map(leaf, make_params())


def with_value(tree, value: float):
  """``tree`` with one entry of its first leaf set to ``value`` (NaN or Inf)."""
  leaves, treedef = jax.tree.flatten(tree)
  leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(value)
  return jax.tree.unflatten(treedef, leaves)


def make_tx(case: Case) -> optax.GradientTransformation:
  return optax.chain(case.make(), optax.adam(1e-2))


def clip_state(opt_state) -> clipchain.ClipNormState:
  (state,) = [
    s
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, clipchain.ClipNormState))
    if isinstance(s, clipchain.ClipNormState)
  ]
  return state


@dataclasses.dataclass
class Trajectory:
  """One case driven through ``make_grads(0)``: ``states[i]`` is the state after ``i`` updates."""

  tx: optax.GradientTransformation
  update: Callable
  params: dict
  grads: dict
  states: list
  updates: list

  def run(self, state, grads):
    """The updates of every step of the stacked ``grads`` from ``state``, and the last state."""
    outputs, states = loop(self.update, state, unstack(grads), self.params)
    return outputs, states[-1]


@functools.cache
def trajectory(case: Case) -> Trajectory:
  """Compiled once per case and shared by the tests: compiling dominates their run time."""
  tx, params, grads = make_tx(case), make_params(), make_grads(0)
  update, state = jax.jit(tx.update), tx.init(params)
  updates, states = loop(update, state, unstack(grads), params)
  return Trajectory(tx, update, params, grads, [state, *states], updates)


@all_cases
def test_the_spikes_are_clipped(case):
  """The sequence exercises the policy: its state has moved by the last spike, which is clipped."""
  t = trajectory(case)
  assert float(clip_state(t.states[SPIKES[-1] + 1]).clipped_fraction) > 0


@all_cases
def test_orbax_round_trip_is_bit_exact_and_training_continues_identically(case, tmp_path):
  t = trajectory(case)
  state = t.states[7]
  restored = orbax_round_trip(tmp_path / "state", state)
  assert_bits_equal(restored, state)
  assert clip_state(restored).name == case.name
  assert clip_state(restored).layer_names == clip_state(state).layer_names
  assert type(clip_state(restored).policy_state) is type(clip_state(state).policy_state)
  rest = jax.tree.map(lambda x: x[7:], t.grads)
  updates, final = t.run(restored, rest)
  assert_bits_equal(updates, t.updates[7:])
  assert_bits_equal(final, t.states[-1])


@all_cases
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_step_keeps_policy_state(case, bad):
  t = trajectory(case)
  state = t.states[6]
  _, after = t.update(with_value(at(t.grads, 6), bad), state, t.params)
  assert int(clip_state(after).count) == int(clip_state(state).count) + 1
  assert not np.isfinite(clip_state(after).norm)
  assert_bits_equal(clip_state(after).policy_state, clip_state(state).policy_state)


@all_cases
def test_finite_steps_change_a_stateful_policy(case):
  """The check above can fail: finite steps do move the policy state of every adaptive policy."""
  t = trajectory(case)
  before, now = (clip_state(t.states[i]).policy_state for i in (6, 7))
  changed = any(
    not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(now))
  )
  assert changed == case.stateful


@all_cases
def test_policy_state_has_fixed_shapes_and_dtypes(case):
  t = trajectory(case)
  policy_leaves = jax.tree.leaves(clip_state(t.states[0]).policy_state)
  assert bool(policy_leaves) == case.stateful
  for leaf in policy_leaves:
    assert leaf.dtype in (jnp.float32, jnp.int32, jnp.bool_), leaf.dtype
    assert leaf.size > 0, "Orbax cannot save a zero-size array"
  structs = [jax.tree.map(ocp.utils.to_shape_dtype_struct, s) for s in t.states]
  assert all(s == structs[0] for s in structs)


@all_cases
def test_stats_report_a_finite_threshold(case):
  t = trajectory(case)
  stats = clipchain.stats(t.states[-1])
  prefix = f"{case.name}/threshold"
  keys = [k for k in stats if k == prefix or k.startswith(prefix + "/")]
  if case.per_layer:
    assert keys == [f"{prefix}/{n}" for n in clip_state(t.states[-1]).layer_names]
  else:
    assert keys == [prefix]
  for key, value in stats.items():
    assert np.all(np.isfinite(value)), (key, value)
  assert all(float(stats[k]) > 0 for k in keys)


@all_cases
def test_vmap_of_update_matches_each_sequence(case):
  t = trajectory(case)
  grads = jax.tree.map(lambda x, y: jnp.stack([x, 3 * y, y[::-1]], 1), t.grads, make_grads(4))
  params = jax.tree.map(lambda x: jnp.stack([x] * BATCH), t.params)
  states = jax.vmap(t.tx.init)(params)
  update = jax.jit(jax.vmap(t.tx.update))
  batched, states = loop(update, states, unstack(grads), params)
  states = states[-1]
  # The first sequence is the trajectory's own; the other two differ from it and from each other.
  for b in range(BATCH):
    sequence = jax.tree.map(operator.itemgetter((slice(None), b)), grads)
    alone, state = t.run(t.states[0], sequence)
    chex.assert_trees_all_close([at(u, b) for u in batched], alone, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(at(states, b), state, rtol=1e-5, atol=1e-7)


@all_cases
def test_lax_scan_matches_a_python_loop(case):
  t = trajectory(case)
  state, updates, _ = scan(t.tx, t.grads, params=t.params)
  chex.assert_trees_all_close(
    [at(updates, i) for i in range(STEPS)], t.updates, rtol=1e-5, atol=1e-7
  )
  chex.assert_trees_all_close(state, t.states[-1], rtol=1e-5, atol=1e-7)

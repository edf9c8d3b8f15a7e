"""skip_nonfinite: a batch with a NaN or an infinity leaves no trace, bit for bit.

The reference for "no trace" is the same compiled step run over the same batches without the bad
one: parameters and the whole inner optimizer state must be equal bit for bit (compared as unsigned
integers, so that ``-0.0 != +0.0`` and a NaN equals only itself).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from harness import assert_bits_equal, bits
from jax.experimental import checkify

import clipchain

N_STEPS = 5
OPTIMIZERS = {
  "adam": lambda: optax.adam(1e-2),
  "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
  "sgd_momentum": lambda: optax.sgd(1e-2, momentum=0.9),
  "lion": lambda: optax.lion(1e-3, weight_decay=0.1),
}
BAD_VALUES = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf}


def init_params():
  """A small tree with a leaf ``zero = [-0.0, +0.0]`` whose gradient is always exactly 0."""
  rng = np.random.default_rng(0)
  return {
    "dense": {
      "kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
    },
    "zero": jnp.array([-0.0, 0.0], jnp.float32),
  }


def clean_batches(n: int = N_STEPS, seed: int = 1):
  """Gradients of global norm ~7, so that a clip at 1.0 scales every step down."""
  rng = np.random.default_rng(seed)
  return [
    {
      "dense": {
        "kernel": jnp.asarray(2 * rng.normal(size=(3, 4)), jnp.float32),
        "bias": jnp.asarray(2 * rng.normal(size=(4,)), jnp.float32),
      },
      "zero": jnp.zeros(2, jnp.float32),
    }
    for _ in range(n)
  ]


def corrupt(grads, value: float, where: str):
  """``value`` in one entry of one leaf, or in one entry of every leaf."""
  if where == "one_leaf":
    kernel = grads["dense"]["kernel"].at[1, 2].set(value)
    return {"dense": {**grads["dense"], "kernel": kernel}, "zero": grads["zero"]}
  return jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(value), grads)


def make_tx(opt_name: str, clipped: bool, **kwargs):
  opt = OPTIMIZERS[opt_name]()
  inner = optax.chain(clipchain.clip_by_global_norm(1.0), opt) if clipped else opt
  return clipchain.skip_nonfinite(inner, **kwargs)


def counts(state) -> list[int]:
  """Every ``count`` field in an optimizer state."""
  return [int(c) for _, c in optax.tree.get_all_with_path(state, "count")]


@functools.cache
def stepper(opt_name: str, clipped: bool):
  """``(tx, step)``; one compiled step per optimizer and chain, shared by every test."""
  tx = make_tx(opt_name, clipped)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return tx, jax.jit(step)


def run(opt_name, clipped, batches):
  """Parameters and state after each step (index 0: before the first)."""
  tx, step = stepper(opt_name, clipped)
  params = init_params()
  state = tx.init(params)
  trajectory = [(params, state)]
  for grads in batches:
    params, state = step(params, state, grads)
    trajectory.append((params, state))
  return trajectory


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("clipped", [True, False], ids=["clip", "no_clip"])
@pytest.mark.parametrize("when", [0, 2], ids=["first_step", "mid_run"])
@pytest.mark.parametrize("where", ["one_leaf", "all_leaves"])
@pytest.mark.parametrize("bad", list(BAD_VALUES))
def test_bad_batch_leaves_no_trace(bad, where, when, clipped, opt_name):
  clean = clean_batches()
  seen = [*clean[:when], corrupt(clean[when], BAD_VALUES[bad], where), *clean[when:]]
  guarded = run(opt_name, clipped, seen)
  never_seen = run(opt_name, clipped, clean)

  # The bad step changed no bit of the parameters or of the inner state...
  before, after = guarded[when], guarded[when + 1]
  assert_bits_equal(after[0], before[0])
  assert_bits_equal(after[1].inner_state, before[1].inner_state)
  assert bool(after[1].skipped)
  # ... so the run ends where the run that never saw the batch ends, step counts included.
  params, state = guarded[-1]
  ref_params, ref_state = never_seen[-1]
  assert_bits_equal(params, ref_params)
  assert_bits_equal(state.inner_state, ref_state.inner_state)
  assert all(c == N_STEPS for c in counts(state.inner_state))
  # The leaf with a zero gradient is still [-0.0, +0.0], signs included.
  np.testing.assert_array_equal(np.signbit(params["zero"]), [True, False])
  assert int(state.total_skipped) == 1
  assert int(state.consecutive_skipped) == 0
  assert not bool(state.skipped)
  assert int(ref_state.total_skipped) == 0


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_guard_does_not_change_a_clean_run(opt_name):
  """Without bad batches the guarded run is the unguarded optimizer's run."""
  batches = clean_batches()
  params, state = run(opt_name, True, batches)[-1]
  inner = optax.chain(clipchain.clip_by_global_norm(1.0), OPTIMIZERS[opt_name]())

  @jax.jit
  def step(params, state, grads):
    updates, state = inner.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  ref_params, ref_state = init_params(), inner.init(init_params())
  for grads in batches:
    ref_params, ref_state = step(ref_params, ref_state, grads)
  # Two compiled programs may fuse, and so round, differently: equal to rounding, not in bits.
  chex.assert_trees_all_close(params, ref_params, rtol=1e-6, atol=1e-9)
  chex.assert_trees_all_close(state.inner_state, ref_state, rtol=1e-6, atol=1e-9)


def test_skipped_update_is_negative_zero():
  """``p + (-0.0)`` is ``p`` for every ``p``; ``p + 0.0`` would turn ``-0.0`` into ``+0.0``."""
  tx, _ = stepper("adam", True)
  params = {
    "dense": {"kernel": jnp.zeros((3, 4)), "bias": jnp.array([-0.0, 0.0, np.inf, -np.inf])},
    "zero": jnp.array([-0.0, np.nan], jnp.float32),
  }
  bad = corrupt(clean_batches(1)[0], np.nan, "one_leaf")
  updates, _ = jax.jit(tx.update)(bad, tx.init(params), params)
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(bits(u), bits(np.full(u.shape, -0.0, np.float32)))
  assert_bits_equal(optax.apply_updates(params, updates), params)
  positive_zero = jax.tree.map(jnp.zeros_like, updates)
  assert not np.signbit(optax.apply_updates(params, positive_zero)["zero"][0])


LOSS_TX = make_tx("sgd_momentum", True)


def loss_step(params, state, grads, loss):
  return LOSS_TX.update(grads, state, params, loss=loss)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "+inf", "-inf"])
def test_nonfinite_loss_with_finite_grads_is_skipped(value, maybe_jit):
  step = maybe_jit(loss_step)
  params = init_params()
  state = LOSS_TX.init(params)
  grads = clean_batches(1)[0]
  updates, state = step(params, state, grads, jnp.float32(1.5))
  assert not bool(state.skipped)
  applied = state.inner_state
  updates, state = step(params, state, grads, jnp.float32(value))
  assert bool(state.skipped)
  assert int(state.total_skipped) == 1
  assert_bits_equal(state.inner_state, applied)
  assert_bits_equal(optax.apply_updates(params, updates), params)
  # A per-example loss with one bad entry is a bad loss too.
  per_example = jnp.array([0.5, value, 2.0], jnp.float32)
  _, state = step(params, state, grads, per_example)
  assert bool(state.skipped)
  assert int(state.consecutive_skipped) == 2


def test_counters_follow_a_pattern_of_bad_steps(maybe_jit):
  pattern = [False, True, True, False, True, True, True, False, True]
  tx = make_tx("sgd_momentum", False)
  step = maybe_jit(lambda p, s, g: tx.update(g, s, p)[1])
  params = init_params()
  state = tx.init(params)
  batches = clean_batches(len(pattern))
  total = consecutive = 0
  for grads, is_bad in zip(batches, pattern):
    state = step(params, state, corrupt(grads, np.inf, "one_leaf") if is_bad else grads)
    total += is_bad
    consecutive = consecutive + 1 if is_bad else 0
    assert bool(state.skipped) == is_bad
    assert int(state.total_skipped) == total
    assert int(state.consecutive_skipped) == consecutive
    assert not bool(state.limit_exceeded)  # no limit set
    stats = clipchain.stats(state)
    assert float(stats["skip_nonfinite/total_skipped"]) == total
    assert float(stats["skip_nonfinite/consecutive_skipped"]) == consecutive
    assert float(stats["skip_nonfinite/skipped"]) == float(is_bad)
  # The momentum is the one accumulated over the good batches only.
  ref = tx.init(params)
  for grads in (g for g, is_bad in zip(batches, pattern) if not is_bad):
    ref = step(params, ref, grads)
  assert_bits_equal(state.inner_state, ref.inner_state)


def test_stats_keys():
  tx = make_tx("adam", True)
  state = tx.init(init_params())
  assert set(clipchain.stats(state)) == {
    "skip_nonfinite/skipped",
    "skip_nonfinite/total_skipped",
    "skip_nonfinite/consecutive_skipped",
    "skip_nonfinite/limit_exceeded",
    "clip_by_global_norm/norm",
    "clip_by_global_norm/clipped_norm",
    "clip_by_global_norm/threshold",
    "clip_by_global_norm/clipped_fraction",
  }
  named = clipchain.skip_nonfinite(optax.sgd(0.1), name="guard").init(init_params())
  assert set(clipchain.stats(named)) == {
    "guard/skipped",
    "guard/total_skipped",
    "guard/consecutive_skipped",
    "guard/limit_exceeded",
  }


LIMIT = 2
# bad, bad (at the limit), bad (past it), good, bad: the flag stays set once set.
LIMIT_PATTERN = [True, True, True, False, True]
LIMIT_EXCEEDED = [False, False, True, True, True]


@functools.cache
def limited_step():
  tx = clipchain.skip_nonfinite(
    optax.chain(clipchain.clip_by_global_norm(1.0), optax.sgd(0.1)), max_consecutive=LIMIT
  )

  # check_guards must run under checkify; the error comes back as a value next to the result.
  @jax.jit
  @checkify.checkify
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    clipchain.check_guards(state)
    return optax.apply_updates(params, updates), state

  return tx, step


def limit_batches():
  batches = clean_batches(len(LIMIT_PATTERN))
  return [corrupt(g, np.nan, "all_leaves") if b else g for g, b in zip(batches, LIMIT_PATTERN)]


def test_max_consecutive_sets_a_sticky_flag():
  tx, step = limited_step()
  params = init_params()
  state = tx.init(params)
  assert state.max_consecutive == LIMIT
  for grads, exceeded in zip(limit_batches(), LIMIT_EXCEEDED):
    _, (params, state) = step(params, state, grads)
    assert bool(state.limit_exceeded) == exceeded
    assert float(clipchain.stats(state)["skip_nonfinite/limit_exceeded"]) == float(exceeded)
  assert int(state.total_skipped) == 4
  assert int(state.consecutive_skipped) == 1


def test_max_consecutive_raises_through_checkify():
  tx, step = limited_step()
  params = init_params()
  state = tx.init(params)
  for grads, exceeded in zip(limit_batches(), LIMIT_EXCEEDED):
    err, (params, state) = step(params, state, grads)
    if exceeded:
      with pytest.raises(checkify.JaxRuntimeError, match="more than 2 consecutive steps"):
        err.throw()
    else:
      assert err.get() is None
      err.throw()  # raises nothing


def test_max_consecutive_zero_fails_on_the_first_bad_step():
  tx = clipchain.skip_nonfinite(optax.sgd(0.1), max_consecutive=0)
  params = init_params()
  state = tx.init(params)
  _, state = tx.update(clean_batches(1)[0], state, params)
  assert not bool(state.limit_exceeded)
  _, state = tx.update(corrupt(clean_batches(1)[0], -np.inf, "one_leaf"), state, params)
  assert bool(state.limit_exceeded)


def test_check_guards_ignores_guards_without_a_limit():
  tx = make_tx("adam", True)

  @jax.jit
  @checkify.checkify
  def step(params, state, grads):
    _, state = tx.update(grads, state, params)
    clipchain.check_guards(state)
    return state

  params = init_params()
  state = tx.init(params)
  for _ in range(3):
    err, state = step(params, state, corrupt(clean_batches(1)[0], np.nan, "one_leaf"))
    assert err.get() is None
  assert int(state.consecutive_skipped) == 3


@pytest.mark.parametrize("value", [-1, 1.5, True, None])
def test_max_consecutive_validation(value):
  if value is None:
    clipchain.skip_nonfinite(optax.sgd(0.1), max_consecutive=None)  # no limit is allowed
    return
  error = ValueError if value == -1 and not isinstance(value, bool) else TypeError
  with pytest.raises(error, match="max_consecutive"):
    clipchain.skip_nonfinite(optax.sgd(0.1), max_consecutive=value)


SCAN_BAD = (1, 4, 5)


def test_lax_scan_over_a_sequence():
  tx, _ = stepper("adam", True)
  batches = clean_batches(8)
  seen = [corrupt(g, np.nan, "one_leaf") if i in SCAN_BAD else g for i, g in enumerate(batches)]

  @jax.jit
  def train(params, sequence):
    def body(carry, grads):
      params, state = carry
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
      return (params, state), (params, state.skipped, state.consecutive_skipped)

    return jax.lax.scan(body, (params, tx.init(params)), sequence)

  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *seen)
  (params, state), (trajectory, skipped, consecutive) = train(init_params(), stacked)
  np.testing.assert_array_equal(skipped, [i in SCAN_BAD for i in range(8)])
  np.testing.assert_array_equal(consecutive, [0, 1, 0, 0, 1, 2, 0, 0])
  assert int(state.total_skipped) == len(SCAN_BAD)
  for i in SCAN_BAD:  # in the compiled loop too, a skipped step changes no bit
    assert_bits_equal(*(jax.tree.map(lambda x, k=k: x[k], trajectory) for k in (i, i - 1)))
  # The step-by-step run over the good batches only ends at the same place.
  good = [g for i, g in enumerate(batches) if i not in SCAN_BAD]
  ref_params, ref_state = run("adam", True, good)[-1]
  chex.assert_trees_all_close(params, ref_params, rtol=1e-6, atol=0)
  chex.assert_trees_all_close(state.inner_state, ref_state.inner_state, rtol=1e-6, atol=0)


def test_vmap_over_independent_runs():
  """Three runs in one batched step; only the second one sees a NaN, at its second step."""
  tx, step = stepper("lion", True)
  runs = [clean_batches(3, seed=s) for s in (1, 2, 3)]
  runs[1][1] = corrupt(runs[1][1], np.nan, "all_leaves")
  params = jax.tree.map(lambda x: jnp.stack([x] * 3), init_params())
  state = jax.vmap(tx.init)(params)
  batched = jax.jit(jax.vmap(step))
  for t in range(3):
    previous = params
    grads = jax.tree.map(lambda *xs: jnp.stack(xs), *(batches[t] for batches in runs))
    params, state = batched(params, state, grads)
    if t == 1:
      np.testing.assert_array_equal(state.skipped, [False, True, False])
      assert_bits_equal(
        jax.tree.map(lambda x: x[1], params), jax.tree.map(lambda x: x[1], previous)
      )
  np.testing.assert_array_equal(state.total_skipped, [0, 1, 0])
  for _, count in optax.tree.get_all_with_path(state.inner_state, "count"):
    np.testing.assert_array_equal(count, [3, 2, 3])
  for k, batches in enumerate(runs):
    good = [g for g in batches if all(np.isfinite(x).all() for x in jax.tree.leaves(g))]
    ref_params, _ = run("lion", True, good)[-1]
    chex.assert_trees_all_close(
      jax.tree.map(lambda x, k=k: x[k], params), ref_params, rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("clip_head", [False, True], ids=["alone", "clip_head"])
def test_finite_values_whose_squares_overflow_are_not_skipped(clip_head):
  """Finite values whose float32 sum of squares overflows are measured again, scaled: the norm is
  the float64 one and the step is applied, with or without a clip at the head reusing its norm."""
  inner = optax.sgd(0.1)
  if clip_head:
    inner = optax.chain(clipchain.clip_by_global_norm(1e30), inner)
  tx = clipchain.skip_nonfinite(inner)
  params = {"w": jnp.zeros(2)}
  grads = {"w": jnp.array([3e19, 1.0])}
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  assert not bool(state.skipped)
  np.testing.assert_allclose(float(state.grad_norm), 3e19, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(updates["w"]), [-3e18, -0.1], rtol=1e-6)

"""guarded_step: the guard's decisions as a step that owns the update's application.

The reference is the guard as a transform, run beside it on the same batches (the transform form
is tested against runs that never saw the bad batches in test_guards_*.py): after every step the
parameters and the whole state of both hold the same decisions, counters and flags exactly and the
same floats to a few units in the last place (XLA fuses the same arithmetic differently around a
conditional than around a select), and a skipped step leaves every bit of the parameters as it
was (as unsigned integers: ``-0.0`` and ``+0.0`` differ, a NaN equals only itself).
"""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from harness import assert_bits_equal, orbax_round_trip
from test_guards_nonfinite import init_params

import clipchain
from clipchain._src import norms

LR = 1e-2
SPIKES = dict(sigma=3.0, window=8, min_history=4)
N_STEPS = 16
NAN_AT, INF_AT, NEG_INF_AT, SPIKE_AT, NAN_LOSS_AT, LOSS_SPIKE_AT = 3, 6, 7, 10, 12, 14


def clip_adam():
  return optax.chain(clipchain.clip_by_global_norm(1.0), optax.adam(LR))


GUARDS = {
  "nonfinite": lambda: clipchain.skip_nonfinite(clip_adam(), max_consecutive=1),
  "nonfinite(adam)": lambda: clipchain.skip_nonfinite(optax.adam(LR)),
  "spikes(record_skipped=False)": lambda: clipchain.skip_spikes(
    clip_adam(), record_skipped=False, **SPIKES
  ),
  "spikes(grad_norm, loss)": lambda: clipchain.skip_spikes(
    clip_adam(), watch=("grad_norm", "loss"), **SPIKES
  ),
  "spikes(nonfinite)": lambda: clipchain.skip_spikes(
    clipchain.skip_nonfinite(clip_adam(), max_consecutive=1), **SPIKES
  ),
  "nonfinite(spikes(loss))": lambda: clipchain.skip_nonfinite(
    clipchain.skip_spikes(clip_adam(), watch=("loss",), **SPIKES)
  ),
  "spikes(layer clip, adamw)": lambda: clipchain.skip_spikes(
    optax.chain(clipchain.clip_by_layer_norm(0.5), optax.adamw(LR, weight_decay=0.1)), **SPIKES
  ),
  "nonfinite(inject_hyperparams(zclip), sgd)": lambda: clipchain.skip_nonfinite(
    optax.chain(
      optax.inject_hyperparams(clipchain.zclip)(z_thresh=2.0, warmup_steps=3),
      optax.sgd(LR, momentum=0.9),
    )
  ),
}


def batches(n=N_STEPS, seed=1):
  """Gradients of norm ~4 within a few percent, a NaN, +inf and -inf step, a 50x spike, and the
  losses: 1 +- 1 %, a NaN and a 50x spike."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    kernel, bias = rng.normal(size=(3, 4)), rng.normal(size=4)
    scale = 4.0 * (1.0 + 0.03 * rng.normal()) / np.sqrt((kernel**2).sum() + (bias**2).sum())
    kernel, bias = scale * kernel, scale * bias
    if i == SPIKE_AT:
      kernel, bias = 50 * kernel, 50 * bias
    for at, value in ((NAN_AT, np.nan), (INF_AT, np.inf), (NEG_INF_AT, -np.inf)):
      if i == at:
        kernel[1, 2] = value
    loss = 1.0 + 0.01 * rng.normal()
    loss = np.nan if i == NAN_LOSS_AT else 50.0 * loss if i == LOSS_SPIKE_AT else loss
    grads = {
      "dense": {"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)},
      "zero": jnp.zeros(2, jnp.float32),
    }
    out.append((grads, jnp.float32(loss)))
  return out


def assert_same(actual, expected):
  """Same structure; integers and booleans equal, floats within a few ulps of the leaf's scale
  (NaN where NaN)."""
  chex.assert_trees_all_equal_structs(actual, expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    a, e = np.asarray(a), np.asarray(e)
    assert a.dtype == e.dtype
    if np.issubdtype(a.dtype, np.floating):
      finite = e[np.isfinite(e)]
      scale = float(np.max(np.abs(finite))) if finite.size else 0.0
      # Statistics such as a z-score divide by a small spread, amplifying an ulp tenfold or more.
      np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-6 * scale)
    else:
      np.testing.assert_array_equal(a, e)


def transform_step(guard):
  def step(params, state, grads, loss):
    updates, state = guard.update(grads, state, params, loss=loss)
    return optax.apply_updates(params, updates), state

  return step


@pytest.mark.parametrize("name", list(GUARDS))
def test_same_decisions_state_and_bits_as_the_transform(name):
  """Initialised eagerly, stepped by a donated jit: every step the transform form's."""
  guard = GUARDS[name]()
  step = jax.jit(clipchain.guarded_step(guard), donate_argnums=(0, 1))
  reference = jax.jit(transform_step(guard))
  params, state = init_params(), guard.init(init_params())
  ref_params, ref_state = init_params(), guard.init(init_params())
  skipped = []
  for grads, loss in batches():
    before = jax.tree.map(np.array, params)
    params, state = step(params, state, grads, loss=loss)
    ref_params, ref_state = reference(ref_params, ref_state, grads, loss)
    assert_same((params, state), (ref_params, ref_state))
    assert clipchain.stats(state).keys() == clipchain.stats(ref_state).keys()
    if bool(state.skipped) or bool(getattr(state.inner_state, "skipped", False)):
      assert_bits_equal(params, before)
      skipped.append(True)
    else:
      skipped.append(False)
  assert any(skipped) and not all(skipped)
  np.testing.assert_array_equal(np.signbit(params["zero"]), [True, False])


def test_a_guard_judges_every_step_another_skips():
  """Nested guards: each counts its own skips; the optimizer's step count the applied steps."""
  guard = GUARDS["spikes(nonfinite)"]()
  step = jax.jit(clipchain.guarded_step(guard))
  params, state = init_params(), guard.init(init_params())
  for grads, loss in batches():
    params, state = step(params, state, grads, loss=loss)
  stats = clipchain.stats(state)
  # NaN, +inf, -inf gradients and the NaN loss; skip_spikes watches only the gradient norm.
  assert float(stats["skip_nonfinite/total_skipped"]) == 4
  assert float(stats["skip_spikes/total_skipped"]) == 4  # the non-finite gradients and the spike
  assert float(stats["skip_nonfinite/limit_exceeded"]) == 1  # +inf then -inf: 2 > 1 in a row
  counts = [int(c) for _, c in optax.tree.get_all_with_path(state, "count")]
  assert counts == [N_STEPS - 5] * 2  # the clip's and Adam's


def test_under_vmap_and_scan():
  """Independent runs under vmap (the cond becomes a select) inside a scan over steps."""
  guard = GUARDS["spikes(nonfinite)"]()
  step = clipchain.guarded_step(guard)
  data = batches()
  grads = jax.tree.map(lambda *g: jnp.stack(g), *[g for g, _ in data])
  # Run 0 sees the batches as they are, run 1 the same scaled by 0.5.
  runs = jax.tree.map(lambda g: jnp.stack([g, 0.5 * g]), grads)

  def run(grads):
    params = init_params()

    def body(carry, g):
      return step(*carry, g), None

    return jax.lax.scan(body, (params, guard.init(params)), grads)[0]

  params, state = jax.jit(jax.vmap(run))(runs)
  reference = jax.jit(transform_step(guard))
  for r in range(2):
    p, s = init_params(), guard.init(init_params())
    for g, _ in data:
      g = jax.tree.map(lambda x, c=(1.0, 0.5)[r]: x * c, g)
      p, s = reference(p, s, g, None)
    np.testing.assert_allclose(params["dense"]["kernel"][r], p["dense"]["kernel"], rtol=1e-6)
    assert int(state.total_skipped[r]) == int(s.total_skipped) == 4


def test_finite_gradient_whose_squares_overflow_is_applied():
  guard = GUARDS["nonfinite"]()
  params = {"w": jnp.ones(4)}
  params, state = jax.jit(clipchain.guarded_step(guard))(
    params, guard.init(params), {"w": jnp.full(4, 3e19, jnp.float32)}
  )
  assert not bool(state.skipped)
  assert float(state.grad_norm) == pytest.approx(6e19, rel=1e-6)
  assert not np.array_equal(params["w"], np.ones(4))


def test_around_multisteps():
  """A guard around MultiSteps drops a bad micro-batch before it is accumulated (as the
  transform)."""
  k = 3
  guard = clipchain.skip_nonfinite(optax.MultiSteps(clip_adam(), k).gradient_transformation())
  step = jax.jit(clipchain.guarded_step(guard))
  reference = jax.jit(transform_step(guard))
  params, state = init_params(), guard.init(init_params())
  ref_params, ref_state = params, state
  for grads, _ in batches()[: 3 * k]:  # the NaN, +inf and -inf micro-batches among them
    params, state = step(params, state, grads)
    ref_params, ref_state = reference(ref_params, ref_state, grads, None)
    assert_same((params, state), (ref_params, ref_state))
  assert int(state.total_skipped) == 3
  assert (int(state.inner_state.gradient_step), int(state.inner_state.mini_step)) == (2, 0)


def test_orbax_round_trip(tmp_path):
  """The state is the guard's: it saves and restores as it does, and the run goes on the same."""
  guard = GUARDS["spikes(nonfinite)"]()
  step = jax.jit(clipchain.guarded_step(guard))
  params, state = init_params(), guard.init(init_params())
  data = batches()
  for grads, loss in data[:12]:
    params, state = step(params, state, grads, loss=loss)
  restored = orbax_round_trip(tmp_path / "state", state)
  assert_bits_equal(restored, state)
  for grads, loss in data[12:]:
    after_restore = step(params, restored, grads, loss=loss)
    params, state = step(params, state, grads, loss=loss)
    assert_bits_equal(after_restore, (params, state))
    restored = after_restore[1]


# ---------------------------------------------------------------------------------------------
# One read of the gradient


SHAPE = (37, 53)


def _reductions_of_the_leaf(eqns) -> int:
  """Sums over a (37, 53) array among ``eqns``, not looking into conditionals."""
  return sum(
    e.primitive.name == "reduce_sum" and tuple(e.invars[0].aval.shape) == SHAPE for e in eqns
  )


def test_the_clip_inside_reuses_the_measured_squares():
  """Before the conditional the leaf is summed once; in the branch that runs the update, the clip
  takes that sum instead of reading the leaf again (its rescue branches aside)."""
  params = {"a": jnp.ones(SHAPE), "b": jnp.ones((53,))}
  for guard in (GUARDS["spikes(nonfinite)"](), GUARDS["spikes(layer clip, adamw)"]()):
    jaxpr = jax.make_jaxpr(clipchain.guarded_step(guard))(params, guard.init(params), params).jaxpr
    assert _reductions_of_the_leaf(jaxpr.eqns) == 1
    (update,) = [
      e
      for e in jaxpr.eqns
      if e.primitive.name == "cond" and any(v.aval.shape == SHAPE for v in e.outvars)
    ]
    _, run = update.params["branches"]
    assert _reductions_of_the_leaf(run.jaxpr.eqns) == 0
    assert any(e.primitive.name == "cond" for e in run.jaxpr.eqns)  # the clip's rescue, kept


def test_no_gradient_sized_temporary_and_no_copy():
  """The compiled donated step: the moments and parameters are updated in place inside the
  branch, with nothing gradient-sized written besides (the transform form writes ~2 gradients)."""
  params = {f"w{i}": jnp.ones((256, 256)) for i in range(4)}
  grad_bytes = 4 * 256 * 256 * 4
  guard = GUARDS["spikes(nonfinite)"]()
  compiled = (
    jax.jit(clipchain.guarded_step(guard), donate_argnums=(0, 1))
    .lower(params, guard.init(params), params)
    .compile()
  )
  memory = compiled.memory_analysis()
  assert memory.temp_size_in_bytes < grad_bytes / 100
  assert memory.alias_size_in_bytes >= 3 * grad_bytes  # params and Adam's two moments
  assert not re.findall(r"= f32\[256,256\]\S* copy\(", compiled.as_text())
  transform = (
    jax.jit(transform_step(guard), donate_argnums=(0, 1))
    .lower(params, guard.init(params), params, None)
    .compile()
  )
  assert transform.memory_analysis().temp_size_in_bytes > grad_bytes


def test_known_squares_match_only_the_very_array():
  x = jnp.arange(6.0).reshape(2, 3)
  equal = jnp.arange(6.0).reshape(2, 3)
  with norms.known_squares([x], [jnp.float32(-1.0)]):
    assert float(norms.sum_of_squares(x)) == -1.0
    assert float(norms.sum_of_squares(x, axis=(0, 1))) == -1.0
    assert float(norms.sum_of_squares(x, axis=(-1, 0))) == -1.0
    assert float(norms.sum_of_squares(equal)) == 55.0
    np.testing.assert_array_equal(norms.sum_of_squares(x, axis=1), [5.0, 50.0])
    assert norms.sum_of_squares(x, keepdims=True).shape == (1, 1)
    assert float(norms.sum_of_squares(x, keepdims=True)[0, 0]) == 55.0
  assert float(norms.sum_of_squares(x)) == 55.0


# ---------------------------------------------------------------------------------------------
# Errors


def test_refuses_what_is_not_a_guard():
  for tx in (optax.adam(LR), clip_adam(), optax.inject_hyperparams(clipchain.skip_nonfinite)):
    with pytest.raises(TypeError, match=r"guard must be a clipchain\.skip_nonfinite"):
      clipchain.guarded_step(tx)


def test_refuses_a_guard_after_a_transform():
  guard = clipchain.skip_spikes(
    optax.chain(optax.scale(2.0), clipchain.skip_nonfinite(clip_adam()))
  )
  params = init_params()
  with pytest.raises(ValueError, match="holds the guard 'skip_nonfinite' after a transform"):
    clipchain.guarded_step(guard)(params, guard.init(params), params)


def test_refuses_another_state():
  guard = GUARDS["spikes(nonfinite)"]()
  params = init_params()
  other = GUARDS["nonfinite"]().init(params)
  with pytest.raises(TypeError, match="SkipSpikesState for 'skip_spikes'; got SkipNonFiniteState"):
    clipchain.guarded_step(guard)(params, other, params)


def test_loss_watch_needs_the_loss():
  guard = GUARDS["spikes(grad_norm, loss)"]()
  params = init_params()
  with pytest.raises(ValueError, match="watches the loss"):
    clipchain.guarded_step(guard)(params, guard.init(params), params)

"""``clip_by_second_moment`` against a float64 NumPy StableAdamW written from the paper.

Wortsman et al. 2023, "Stable and low-precision training for large-scale vision-language models",
Algorithm 2 (StableAdamW): with ``v̂`` the bias-corrected second moment after this step,
``u = sqrt(mean(g² / max(v̂, eps²)))`` per tensor, and the step (Adam's, weight decay included) is
taken with the learning rate divided by ``max(1, u)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from harness import orbax_round_trip

import clipchain
from clipchain._src.norms import unshared

SHAPES = {"kernel": (4, 3), "bias": (3,), "scale": ()}
LR, B1, B2, ADAM_EPS, WD, CLIP_EPS = 0.01, 0.9, 0.95, 1e-8, 0.1, 1e-6


def gradient_sequence(steps: int = 30, seed: int = 0):
  """Gaussian gradients with a 50x spike at step 12 in the kernel and one at 20 in the bias."""
  rng = np.random.default_rng(seed)
  seq = []
  for t in range(steps):
    g = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    if t == 12:
      g["kernel"] = g["kernel"] * 50.0
    if t == 20:
      g["bias"] = g["bias"] * 50.0
    seq.append(g)
  return seq


def stable_adamw_numpy(params, grads_seq, *, granularity="layer"):
  """Float64 StableAdamW: returns the params after every step and each step's per-tensor RMS."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  history, rms_history = [], []
  for t, g in enumerate(grads_seq, start=1):
    rms = {}
    for k in p:
      m[k] = B1 * m[k] + (1 - B1) * g[k]
      v[k] = B2 * v[k] + (1 - B2) * g[k] ** 2
    v_hat = {k: v[k] / (1 - B2**t) for k in p}
    ratio = {k: g[k] ** 2 / np.maximum(v_hat[k], CLIP_EPS**2) for k in p}
    if granularity == "layer":
      rms = {k: np.sqrt(np.mean(ratio[k])) for k in p}
    else:
      total = np.sqrt(sum(np.sum(r) for r in ratio.values()) / sum(r.size for r in ratio.values()))
      rms = {k: total for k in p}
    for k in p:
      lr = LR / max(1.0, rms[k])
      m_hat = m[k] / (1 - B1**t)
      p[k] = p[k] - lr * (m_hat / (np.sqrt(v_hat[k]) + ADAM_EPS) + WD * p[k])
    history.append({k: x.copy() for k, x in p.items()})
    rms_history.append(rms)
  return history, rms_history


def _f32(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _run(tx, params, grads_seq):
  state = tx.init(params)

  @jax.jit
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  history, stats = [], []
  for g in grads_seq:
    params, state = step(params, state, _f32(g))
    history.append(params)
    stats.append(clipchain.stats(state))
  return history, stats, state


@pytest.mark.parametrize("granularity", ["layer", "global"])
def test_matches_stable_adamw_from_the_paper(granularity):
  params = _f32({k: np.full(s, 0.5) for k, s in SHAPES.items()})
  seq = gradient_sequence()
  tx = clipchain.clip_by_second_moment(
    optax.adamw(LR, b1=B1, b2=B2, eps=ADAM_EPS, weight_decay=WD),
    b2=B2,
    eps=CLIP_EPS,
    granularity=granularity,
  )
  ours, stats, _ = _run(tx, params, seq)
  reference, rms = stable_adamw_numpy(params, seq, granularity=granularity)
  for t, (got, want) in enumerate(zip(ours, reference)):
    for k in SHAPES:
      np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-6, err_msg=f"{t}:{k}")
  if granularity == "layer":
    # The spikes are clipped in exactly the tensor and the step where they occur.
    assert rms[12]["kernel"] > 3 and rms[20]["bias"] > 3
    for t, s in enumerate(stats):
      for k in SHAPES:
        assert float(s[f"clip_by_second_moment/rms/{k}"]) == pytest.approx(rms[t][k], rel=1e-4)
    assert float(stats[12]["clip_by_second_moment/scale_min"]) == pytest.approx(
      1 / rms[12]["kernel"], rel=1e-4
    )


def test_without_spikes_it_is_adamw():
  """Steady gradients keep RMS <= 1: the scale is exactly 1 and the updates are AdamW's."""
  params = _f32({k: np.full(s, 0.5) for k, s in SHAPES.items()})
  rng = np.random.default_rng(1)
  base = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
  # Shrinking gradients: v̂ holds larger squares than this step's, so every RMS is below 1.
  seq = [{k: x * 0.8**t for k, x in base.items()} for t in range(6)]
  adamw = optax.adamw(LR, b1=B1, b2=B2, eps=ADAM_EPS, weight_decay=WD)
  ours, stats, _ = _run(clipchain.clip_by_second_moment(adamw, b2=B2), params, seq)
  theirs, _, _ = _run(adamw, params, seq)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  # On the first step v̂ = g², so RMS is 1 up to rounding; after it, below 1.
  assert all(float(s["clip_by_second_moment/scale_min"]) > 1 - 1e-6 for s in stats)
  assert all(float(s["clip_by_second_moment/rms_max"]) < 1 for s in stats[1:])


def test_reads_the_moment_of_adam_inside_inject_hyperparams_and_chains():
  params = _f32({k: np.full(s, 0.5) for k, s in SHAPES.items()})
  seq = gradient_sequence(15)
  inner = optax.chain(
    optax.inject_hyperparams(optax.adamw)(
      learning_rate=LR, b1=B1, b2=B2, eps=ADAM_EPS, weight_decay=WD
    )
  )
  ours, _, _ = _run(clipchain.clip_by_second_moment(inner, b2=B2, eps=CLIP_EPS), params, seq)
  reference, _ = stable_adamw_numpy(params, seq)
  for k in SHAPES:
    np.testing.assert_allclose(ours[-1][k], reference[-1][k], rtol=2e-5, atol=1e-6)


def test_refuses_an_inner_state_without_a_second_moment_at_init():
  tx = clipchain.clip_by_second_moment(optax.sgd(0.1, momentum=0.9), b2=0.999)
  found_none = r"needs an Adam-family inner optimizer.*second_moment=.*it found none"
  with pytest.raises(ValueError, match=found_none):
    tx.init({"w": jnp.zeros(2)})
  with pytest.raises(ValueError, match=found_none):
    clipchain.clip_by_second_moment(optax.adagrad(0.1), b2=0.9).init({"w": jnp.zeros(2)})


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    ({"b2": 1.0}, ValueError, r"b2 must be in \[0.0, 1.0\); got 1.0"),
    ({"b2": "0.9"}, TypeError, r"b2 must be a number"),
    ({"b2": 0.9, "eps": 0.0}, ValueError, r"eps must be in \(0.0, inf\]; got 0.0"),
    ({"b2": 0.9, "granularity": "unit"}, ValueError, r"granularity must be one of"),
    ({"b2": 0.9, "name": ""}, ValueError, r"name"),
  ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, error, match):
  with pytest.raises(error, match=match):
    clipchain.clip_by_second_moment(optax.adam(0.1), **kwargs)


def test_inner_must_be_a_transformation_not_a_factory():
  with pytest.raises(TypeError, match=r"inner must be an optax.GradientTransformation.*factory"):
    clipchain.clip_by_second_moment(optax.adam, b2=0.999)


def test_inside_skip_nonfinite_a_nan_step_leaves_params_and_moments_untouched():
  params = _f32({k: np.full(s, 0.5) for k, s in SHAPES.items()})
  seq = gradient_sequence(8)
  nan_step = dict(seq[4], kernel=np.full(SHAPES["kernel"], np.nan))
  adamw = optax.adamw(LR, b1=B1, b2=B2, eps=ADAM_EPS, weight_decay=WD)
  guarded = clipchain.skip_nonfinite(clipchain.clip_by_second_moment(adamw, b2=B2))
  ours, stats, state = _run(guarded, params, [*seq[:4], nan_step, *seq[5:]])
  clean, _, clean_state = _run(
    clipchain.skip_nonfinite(clipchain.clip_by_second_moment(adamw, b2=B2)),
    params,
    seq[:4] + seq[5:],
  )
  for a, b in zip(jax.tree.leaves(ours[-1]), jax.tree.leaves(clean[-1])):
    np.testing.assert_array_equal(a, b)
  assert float(stats[4]["skip_nonfinite/skipped"]) == 1.0
  for a, b in zip(jax.tree.leaves(state.inner_state), jax.tree.leaves(clean_state.inner_state)):
    np.testing.assert_array_equal(a, b)


def test_state_round_trips_through_orbax_and_the_run_continues_identically(tmp_path):
  params = _f32({k: np.full(s, 0.5) for k, s in SHAPES.items()})
  seq = gradient_sequence(6)
  tx = clipchain.clip_by_second_moment(optax.adam(LR, b2=B2), b2=B2)
  _, _, state = _run(tx, params, seq[:3])
  restored = orbax_round_trip(tmp_path / "ckpt", state)
  assert restored.layer_names == state.layer_names
  a, _ = tx.update(_f32(seq[3]), state, params)
  b, _ = tx.update(_f32(seq[3]), restored, params)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_vmap_and_scan():
  params = _f32({k: np.full(s, 0.5) for k, s in SHAPES.items()})
  tx = clipchain.clip_by_second_moment(optax.adam(LR, b2=B2), b2=B2)
  seq = _f32(jax.tree.map(lambda *xs: np.stack(xs), *gradient_sequence(5)))

  def train(p):
    def body(carry, g):
      p, s = carry
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), s.rms

    return jax.lax.scan(body, (p, tx.init(p)), seq)

  (final, _), rms = jax.jit(jax.vmap(train))(jax.tree.map(lambda x: jnp.stack([x, 2 * x]), params))
  assert rms.shape == (2, 5, 3)
  ours, _, _ = _run(tx, params, gradient_sequence(5))
  for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(ours[-1])):
    np.testing.assert_allclose(a[0], b, rtol=1e-6)


def test_a_step_with_large_equally_shaped_leaves_writes_no_leaf_sized_array():
  # The floor max(nu, eps² c) is one scalar for every leaf; shared by the per-leaf reductions of
  # equally shaped leaves, XLA's CPU backend would write its broadcast out as a leaf-sized array.
  params = {f"w{i}": jnp.zeros((256, 256)) for i in range(3)}
  tx = clipchain.clip_by_second_moment(optax.adam(1e-3), b2=0.999)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params).compile()
  leaf_bytes = 256 * 256 * 4
  assert compiled.memory_analysis().temp_size_in_bytes < leaf_bytes / 16


@pytest.mark.parametrize("x", [0.0, 1e-30, 1e-12, 1.0, 3e38])
def test_a_per_leaf_copy_of_a_scalar_is_the_same_value(x):
  for index in (0, 1, 999, 2**16 + 3):
    assert float(unshared(jnp.float32(x), index, size=2**20)) == float(np.float32(x))
  small_leaf_scalar = jnp.float32(x)
  assert unshared(small_leaf_scalar, 0, size=10) is small_leaf_scalar  # small leaves share it

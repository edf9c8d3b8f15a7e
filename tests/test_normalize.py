"""The normalize rule and its preset against float64 NumPy, and LARS against optax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from harness import orbax_round_trip

import clipchain
from clipchain.thresholds import RelativeToParams

GRADS = {
  "dense": {"kernel": np.array([[3.0, -4.0], [0.5, 1.0]]), "bias": np.array([0.0, 0.0])},
  "head": np.array([1e-3, -2e-3, 5.0]),
}


def _leaves(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def _as_f32(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


@pytest.mark.parametrize("stabilizer", [0.0, 0.01, 1.0])
def test_global_normalize_sets_the_tree_norm(stabilizer):
  tx = clipchain.normalize(2.0, stabilizer=stabilizer)
  grads = _as_f32(GRADS)
  updates, state = jax.jit(tx.update)(grads, tx.init(grads))
  norm = np.sqrt(sum(np.sum(x**2) for x in _leaves(GRADS)))
  for got, g in zip(_leaves(updates), _leaves(GRADS)):
    np.testing.assert_allclose(got, g * 2.0 / (norm + stabilizer), rtol=1e-6)
  stats = clipchain.stats(state)
  assert float(stats["normalize/norm"]) == pytest.approx(norm, rel=1e-6)
  assert float(stats["normalize/clipped_norm"]) == pytest.approx(
    2.0 * norm / (norm + stabilizer), rel=1e-6
  )


def test_layer_normalize_sets_each_leaf_and_leaves_zero_leaves_at_zero():
  tx = clipchain.normalize(0.5, granularity="layer", stabilizer=0.1)
  grads = _as_f32(GRADS)
  updates, state = tx.update(grads, tx.init(grads))
  for got, g in zip(_leaves(updates), _leaves(GRADS)):
    n = np.sqrt(np.sum(g**2))
    np.testing.assert_allclose(got, g * 0.5 / (n + 0.1), rtol=1e-6, atol=0)
  np.testing.assert_array_equal(updates["dense"]["bias"], 0.0)
  # Changed: the two non-zero leaves (their norms are not 0.5); the zero bias is not.
  assert float(clipchain.stats(state)["normalize/clipped_fraction"]) == pytest.approx(2 / 3)


def test_unit_normalize_sets_each_output_unit():
  tx = clipchain.normalize(1.0, granularity="unit")
  g = {"kernel": jnp.array([[3.0, 0.0], [4.0, 2.0]])}
  updates, _ = tx.update(g, tx.init(g))
  np.testing.assert_allclose(updates["kernel"], [[0.6, 0.0], [0.8, 1.0]], rtol=1e-6)


def test_normalize_scales_small_groups_up_and_large_ones_down():
  tx = clipchain.clip_norm(1.0, rule="normalize", granularity="layer")
  g = {"small": jnp.array([0.03, 0.04]), "large": jnp.array([30.0, 40.0])}
  updates, _ = tx.update(g, tx.init(g))
  np.testing.assert_allclose(updates["small"], [0.6, 0.8], rtol=1e-5)
  np.testing.assert_allclose(updates["large"], [0.6, 0.8], rtol=1e-6)


def test_zero_updates_stay_zero_with_finite_gradients():
  tx = clipchain.normalize(1.0)
  x = {"w": jnp.zeros(3)}
  updates, state = tx.update(x, tx.init(x))
  np.testing.assert_array_equal(updates["w"], 0.0)
  grad = jax.grad(lambda w: jnp.sum(tx.update({"w": w}, tx.init({"w": w}))[0]["w"]))(x["w"])
  assert np.all(np.isfinite(grad))
  assert float(clipchain.stats(state)["normalize/clipped_fraction"]) == 0.0


def test_nan_update_gives_nan_not_a_silent_number():
  tx = clipchain.normalize(1.0)
  g = {"w": jnp.array([jnp.nan, 1.0])}
  updates, _ = tx.update(g, tx.init(g))
  assert np.all(np.isnan(updates["w"]))


@pytest.mark.parametrize("trust", [0.001, 0.02, 1.0])
def test_layer_normalize_relative_to_params_is_optax_trust_ratio(trust):
  """LARS: each leaf's update set to trust x its params' norm, as optax.scale_by_trust_ratio."""
  params = _as_f32({"a": np.array([[1.0, -2.0], [0.5, 3.0]]), "b": np.array([0.2, -0.1, 4.0])})
  ours = optax.chain(
    clipchain.clip_norm(RelativeToParams(trust, eps=0.0), granularity="layer", rule="normalize"),
    optax.sgd(0.1, momentum=0.9),
  )
  theirs = optax.chain(optax.scale_by_trust_ratio(trust_coefficient=trust), optax.sgd(0.1, 0.9))
  s_ours, s_theirs = ours.init(params), theirs.init(params)
  p_ours = p_theirs = params
  rng = np.random.default_rng(0)
  for _ in range(5):
    grads = _as_f32(jax.tree.map(lambda x: rng.standard_normal(x.shape), params))
    u, s_ours = ours.update(grads, s_ours, p_ours)
    p_ours = optax.apply_updates(p_ours, u)
    u, s_theirs = theirs.update(grads, s_theirs, p_theirs)
    p_theirs = optax.apply_updates(p_theirs, u)
  for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_theirs)):
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_normalize_keeps_bfloat16_and_accumulates_in_float32():
  g = {"w": jnp.full((1000,), 0.01, jnp.bfloat16)}
  tx = clipchain.normalize(1.0)
  updates, state = tx.update(g, tx.init(g))
  assert updates["w"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(updates["w"], np.float32), 1 / np.sqrt(1000), rtol=1e-2)
  assert float(state.norm) == pytest.approx(np.sqrt(1000) * float(jnp.bfloat16(0.01)), rel=1e-5)


def test_under_inject_hyperparams_the_norm_and_stabilizer_can_change():
  tx = optax.inject_hyperparams(clipchain.normalize)(norm=1.0, stabilizer=0.0)
  g = {"w": jnp.array([3.0, 4.0])}
  state = tx.init(g)
  state.hyperparams["norm"] = jnp.asarray(10.0)
  state.hyperparams["stabilizer"] = jnp.asarray(5.0)
  updates, _ = jax.jit(tx.update)(g, state)
  np.testing.assert_allclose(updates["w"], [3.0, 4.0], rtol=1e-6)  # 10 / (5 + 5) = 1


def test_state_round_trips_through_orbax(tmp_path):
  tx = clipchain.normalize(1.0, granularity="layer")
  g = _as_f32(GRADS)
  _, state = tx.update(g, tx.init(g))
  restored = orbax_round_trip(tmp_path / "ckpt", state)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(a, b)


def test_bad_arguments_are_refused_at_construction():
  with pytest.raises(ValueError, match=r"Element granularity.*sign descent"):
    clipchain.clip_norm(1.0, granularity="element", rule="normalize")
  with pytest.raises(ValueError, match=r"Element granularity"):
    clipchain.normalize(1.0, granularity="element")
  with pytest.raises(ValueError, match=r"rule must be one of.*'normalise'"):
    clipchain.clip_norm(1.0, rule="normalise")
  with pytest.raises(TypeError, match=r"rule must be a str.*int"):
    clipchain.clip_norm(1.0, rule=3)
  with pytest.raises(ValueError, match=r"stabilizer must be in \[0.0, inf\]; got -0.1"):
    clipchain.normalize(1.0, stabilizer=-0.1)
  with pytest.raises(ValueError, match=r"stabilizer must not be NaN"):
    clipchain.normalize(1.0, stabilizer=float("nan"))
  with pytest.raises(TypeError, match=r"stabilizer must be a number; got '0.1'"):
    clipchain.normalize(1.0, stabilizer="0.1")
  with pytest.raises(TypeError, match=r"unexpected keyword argument 'stabilizer'"):
    clipchain.clip_norm(1.0, stabilizer=0.1)  # the stabilizer belongs to the normalize rule
  with pytest.raises(ValueError, match=r"stabilizer must be in \[0.0, inf\]; got -0.1"):
    clipchain.rules.Normalize(-0.1)
  with pytest.raises(ValueError, match=r"norm must be in \[0.0, inf\]; got -1.0"):
    clipchain.normalize(-1.0)


def test_a_granularity_declares_the_rules_it_refuses():
  class ClipOnly(clipchain.granularity.Global):
    def check_rule(self, rule):
      if not isinstance(rule, clipchain.rules.Clip):
        raise ValueError(f"ClipOnly supports the clip rule only; got {rule!r}.")

  clipchain.clip_norm(1.0, granularity=ClipOnly())  # the default rule still works
  with pytest.raises(ValueError, match=r"ClipOnly supports the clip rule only; got Normalize"):
    clipchain.clip_norm(1.0, granularity=ClipOnly(), rule="normalize")


@pytest.mark.parametrize("magnitude", [1e-30, 1e-20, 1e20, 1e37])
@pytest.mark.parametrize("granularity", ["global", "layer", "unit"])
def test_values_whose_float32_squares_under_or_overflow_are_measured_right(magnitude, granularity):
  """The float32 sum of squares of 1e-20 is 0 and of 1e20 inf: the norm is measured again,
  scaled, and comes out as float64 NumPy says; the normalised update has norm 1 per group."""
  grads = {
    "a": np.array([[3.0, -4.0], [1.0, 2.0]]) * magnitude,
    "b": np.array([1.0, -1.0]) * magnitude,
  }
  tx = clipchain.normalize(1.0, granularity=granularity)
  updates, state = jax.jit(tx.update)(_as_f32(grads), tx.init(_as_f32(grads)))
  as64 = {k: np.asarray(np.float32(v), np.float64) for k, v in grads.items()}
  total = np.sqrt(sum(np.sum(x**2) for x in as64.values()))
  np.testing.assert_allclose(float(state.norm), total, rtol=1e-6)
  if granularity == "global":
    groups = [np.concatenate([x.ravel() for x in _leaves(updates)])]
  elif granularity == "layer":
    groups = _leaves(updates)
  else:  # units: the kernel's columns, the bias's values... its one unit
    groups = [*np.asarray(updates["a"], np.float64).T, np.asarray(updates["b"], np.float64)]
  for group in groups:
    np.testing.assert_allclose(np.linalg.norm(group), 1.0, rtol=1e-6)


def test_the_rescue_branch_costs_nothing_in_the_common_case():
  """One scalar test decides; the branch that measures again is not run for ordinary values."""
  grads = _as_f32(GRADS)
  tx = clipchain.clip_by_global_norm(1.0)
  hlo = jax.jit(tx.update).lower(grads, tx.init(grads)).compile().as_text()
  assert hlo.count("conditional(") == 1
  _, state = jax.jit(tx.update)(grads, tx.init(grads))
  want = np.sqrt(sum(np.sum(x**2) for x in _leaves(GRADS)))
  np.testing.assert_allclose(float(state.norm), want, rtol=1e-6)


def test_stable_spam_clip_of_huge_values_is_finite():
  grads = {"w": jnp.full((4, 3), 1e30, jnp.float32), "b": jnp.full((3,), -1e30, jnp.float32)}
  tx = clipchain.stable_spam_clip()
  updates, state = jax.jit(tx.update)(grads, tx.init(grads))
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  stats = clipchain.stats(state)
  np.testing.assert_allclose(
    float(stats["stable_spam_clip_adaclip/norm"]), np.sqrt(15) * 1e30, rtol=1e-6
  )

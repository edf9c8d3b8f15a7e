"""``stable_spam_clip`` against a float64 NumPy port of Stable-SPAM's gradient side.

The port follows the reference optimizer's step (TianjinYellow/StableSPAM,
``galore_torch/stablespam.py``) for one tensor: AdaClip (``m_max <- theta m_max + (1 - theta)
max|g|``, bias-corrected with the tensor's step count; values with ``|g| > m̂_max`` become
``g / max|g| * m̂_max``), then AdaGN (``m <- gamma1 m + (1 - gamma1) ‖g‖``,
``v <- gamma2 v + (1 - gamma2) ‖g‖²``, bias-corrected; ``g <- g / ‖g‖ * m̂ / (sqrt(v̂) + eps)``
when ``‖g‖ > 0``). One documented difference is modelled: a step whose gradient is not finite
leaves every EMA and step count as they were (the reference would take the NaN in for good).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from harness import orbax_round_trip

import clipchain

SHAPES = {"kernel": (5, 4), "bias": (4,)}


class StableSpamNumpy:
  """Float64 Stable-SPAM gradient transform for a dict of tensors."""

  def __init__(self, gamma1=0.7, gamma2=0.9, theta=0.999, eps=1e-8):
    self.g1, self.g2, self.theta, self.eps = gamma1, gamma2, theta, eps
    self.state = {k: {"step": 0, "m_max": 0.0, "m": 0.0, "v": 0.0} for k in SHAPES}

  def __call__(self, grads):
    total = sum(np.sum(np.asarray(g, np.float64) ** 2) for g in grads.values())
    if not np.isfinite(total):
      return None  # a non-finite step: the state is kept
    out = {}
    for k, g in grads.items():
      g = np.array(g, np.float64)
      st = self.state[k]
      st["step"] += 1
      t = st["step"]
      peak = np.max(np.abs(g))
      st["m_max"] = self.theta * st["m_max"] + (1 - self.theta) * peak
      m_max_hat = st["m_max"] / (1 - self.theta**t)
      mask = np.abs(g) > m_max_hat
      g[mask] = g[mask] / peak * m_max_hat
      norm = np.linalg.norm(g)
      st["m"] = self.g1 * st["m"] + (1 - self.g1) * norm
      st["v"] = self.g2 * st["v"] + (1 - self.g2) * norm**2
      m_hat = st["m"] / (1 - self.g1**t)
      v_hat = st["v"] / (1 - self.g2**t)
      if norm > 0:
        g = g / norm * (m_hat / (np.sqrt(v_hat) + self.eps))
      out[k] = g
    return out


def spiky_sequence(steps: int = 40, seed: int = 0):
  """Gaussian gradients with value spikes (x200 in one entry), a whole-tensor spike, a NaN step
  and an infinite step."""
  rng = np.random.default_rng(seed)
  seq = []
  for t in range(steps):
    g = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    if t in (5, 17, 30):
      g["kernel"][t % 5, t % 4] *= 200.0
    if t == 22:
      g["bias"] = g["bias"] * 50.0
    if t == 11:
      g["kernel"][0, 0] = np.nan
    if t == 26:
      g["bias"][1] = np.inf
    seq.append(g)
  return seq


def _f32(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


@pytest.mark.parametrize(
  "kwargs", [{}, {"gamma1": 0.85, "gamma2": 0.99, "theta": 0.9}], ids=["defaults", "others"]
)
def test_matches_the_reference_step_for_step(kwargs):
  tx = clipchain.stable_spam_clip(**kwargs, clip_statistics=True)
  reference = StableSpamNumpy(**kwargs)
  params = _f32({k: np.zeros(s) for k, s in SHAPES.items()})
  state = tx.init(params)
  step = jax.jit(tx.update)
  clipped_steps = 0
  for t, g in enumerate(spiky_sequence()):
    updates, state = step(_f32(g), state)
    want = reference(g)
    if want is None:
      continue  # the output of a non-finite step is not finite; only the state matters
    for k in SHAPES:
      np.testing.assert_allclose(updates[k], want[k], rtol=2e-5, atol=1e-7, err_msg=f"{t}:{k}")
    stats = clipchain.stats(state)
    clipped_steps += float(stats["stable_spam_clip_adaclip/clipped_fraction"]) > 0
  assert clipped_steps >= 3  # the value spikes were clipped by AdaClip


def test_the_spike_lands_on_the_threshold_and_keeps_its_order():
  tx = clipchain.stable_spam_clip(theta=0.5)
  g0 = {"kernel": jnp.ones((5, 4)), "bias": jnp.ones(4)}
  _, _state = tx.update(g0, tx.init(g0))
  spike = {"kernel": jnp.ones((5, 4)).at[0, 0].set(100.0).at[1, 1].set(50.0), "bias": jnp.ones(4)}
  # AdaClip alone: threshold (0.5 * 0.5 + 0.5 * 100) / 0.75 = 67; 100 -> 67, 50 stays.
  adaclip = clipchain.clip_norm(
    clipchain.thresholds.MaxEMA(0.5), granularity="element", rule="rescale"
  )
  _, s = adaclip.update(g0, adaclip.init(g0))
  out, _ = adaclip.update(spike, s)
  assert float(out["kernel"][0, 0]) == pytest.approx(50.25 / 0.75, rel=1e-6)
  assert float(out["kernel"][1, 1]) == 50.0
  assert float(out["kernel"][2, 2]) == 1.0


def test_non_finite_steps_never_enter_the_state():
  tx = clipchain.stable_spam_clip()
  seq = spiky_sequence(15)
  clean = [g for t, g in enumerate(seq) if t != 11]
  params = _f32({k: np.zeros(s) for k, s in SHAPES.items()})
  step = jax.jit(tx.update)
  with_nan, without = tx.init(params), tx.init(params)
  for g in seq:
    _, with_nan = step(_f32(g), with_nan)
  for g in clean:
    _, without = step(_f32(g), without)
  for clip_with_nan, clip_without in zip(with_nan, without):
    # The EMAs and their step counts: as if the NaN step never happened.
    for a, b in zip(
      jax.tree.leaves(clip_with_nan.policy_state), jax.tree.leaves(clip_without.policy_state)
    ):
      np.testing.assert_array_equal(a, b)
    assert int(clip_with_nan.count) == int(clip_without.count) + 1  # the transform saw it


def test_composes_with_adamw_under_jit_vmap_and_scan():
  tx = optax.chain(clipchain.stable_spam_clip(), optax.adamw(1e-2))
  params = _f32({k: np.full(s, 0.1) for k, s in SHAPES.items()})
  seq = _f32(jax.tree.map(lambda *xs: np.stack(xs), *spiky_sequence(12, seed=3)[:10]))

  def train(p):
    def body(carry, g):
      p, s = carry
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), clipchain.stats(s)["stable_spam_clip_adagn/norm"]

    return jax.lax.scan(body, (p, tx.init(p)), seq)

  batched = jax.tree.map(lambda x: jnp.stack([x, x]), params)
  (final, _), norms = jax.jit(jax.vmap(train))(batched)
  assert norms.shape == (2, 10)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(final))
  np.testing.assert_array_equal(final["kernel"][0], final["kernel"][1])


def test_state_round_trips_through_orbax(tmp_path):
  tx = clipchain.stable_spam_clip()
  params = _f32({k: np.zeros(s) for k, s in SHAPES.items()})
  state = tx.init(params)
  for g in spiky_sequence(4):
    _, state = tx.update(_f32(g), state)
  restored = orbax_round_trip(tmp_path / "ckpt", state)
  g = _f32(spiky_sequence(5)[4])
  a, _ = tx.update(g, state)
  b, _ = tx.update(g, restored)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    ({"gamma1": 1.0}, ValueError, r"gamma1 must be in \[0.0, 1.0\); got 1.0"),
    ({"gamma2": -0.1}, ValueError, r"gamma2 must be in"),
    ({"theta": "0.9"}, TypeError, r"theta must be a number"),
    ({"eps": float("nan")}, ValueError, r"eps must not be NaN"),
    ({"name": 3}, TypeError, r"name must be a str"),
  ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, error, match):
  with pytest.raises(error, match=match):
    clipchain.stable_spam_clip(**kwargs)


def test_norm_moments_refuses_the_element_granularity():
  with pytest.raises(ValueError, match=r"NormMoments needs the norm of a group"):
    clipchain.clip_norm(clipchain.thresholds.NormMoments(), granularity="element")


def test_rescale_is_a_rule_and_normalize_is_refused_per_value():
  with pytest.raises(ValueError, match=r"rule must be one of \['clip', 'rescale', 'normalize'\]"):
    clipchain.clip_norm(1.0, granularity="element", rule="scale")
  with pytest.raises(ValueError, match=r"Element granularity.*sign descent"):
    clipchain.clip_norm(1.0, granularity="element", rule="normalize")

"""examples/fp16_loss_scaling.py: unscale, then guard and clip; the loss scale follows the guard."""

import pathlib

import jax
import jax.numpy as jnp
import jmp
import numpy as np
import pytest
from harness import norm64, same_bits, script_fixture

import clipchain

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "fp16_loss_scaling.py"
STEPS = 40
PERIOD = 10


example = script_fixture(_SCRIPT, "fp16_loss_scaling")


@pytest.fixture(scope="module")
def history(example):
  # 2**20 overflows the float16 backward pass: the first steps must be skipped until it is small
  # enough.
  return example.train(STEPS, initial_scale=2.0**20, period=PERIOD)


def test_overflowing_steps_are_skipped_and_halve_the_scale(history):
  skipped = np.array(history.skipped)
  assert skipped[0]
  assert same_bits(history.params[1], history.params[0])
  for i in np.flatnonzero(skipped):
    assert same_bits(history.params[i + 1], history.params[i])
    if i + 1 < STEPS:
      assert history.loss_scale[i + 1] == history.loss_scale[i] / 2
  first_applied = int(np.argmin(skipped))
  assert history.loss_scale[first_applied] < 2.0**20
  assert np.isfinite(history.loss).all()  # the loss itself is float32: it never overflowed


def test_training_continues_and_the_loss_decreases(history):
  skipped = np.array(history.skipped)
  assert (~skipped).sum() >= STEPS * 3 // 4
  for i in np.flatnonzero(~skipped):
    assert not same_bits(history.params[i + 1], history.params[i])
  # The scale doubles after ``period`` applied steps in a row, and only then.
  scales = np.array(history.loss_scale)
  grew = np.flatnonzero(scales[1:] > scales[:-1])
  assert len(grew) >= 1
  for i in grew:
    assert scales[i + 1] == 2 * scales[i]
    assert not skipped[i - PERIOD + 1 : i + 1].any()
  assert np.mean(history.loss[-8:]) < 0.8 * np.mean(history.loss[:8])


def test_unscale_before_clipping(example):
  """Clipping the scaled gradient and then unscaling it divides the threshold by the scale."""
  xs, ys = example.make_data(1)
  model = example.MLP()
  params = model.init(jax.random.PRNGKey(1), xs[0])
  scale = 2.0**10  # small enough not to overflow
  loss_scale = jmp.DynamicLossScale(jnp.float32(scale))
  grads, _ = jax.jit(example.scaled_grads, static_argnums=0)(
    model, params, xs[0], ys[0], loss_scale
  )
  assert jmp.all_finite(grads)
  true_grads = loss_scale.unscale(grads)
  true_norm = norm64(true_grads)

  def clip(tree, threshold):
    tx = clipchain.clip_by_global_norm(threshold)
    return tx.update(tree, tx.init(tree))[0]

  for threshold in (true_norm / 2, 2 * true_norm):
    right = clip(true_grads, threshold)  # unscale, then clip
    wrong = loss_scale.unscale(clip(grads, threshold))  # clip, then unscale
    assert norm64(right) == pytest.approx(min(threshold, true_norm), rel=1e-5)
    # The scaled norm is always above the threshold, so the wrong order always clips, to
    # threshold / scale: far below both the threshold and the true norm.
    assert norm64(wrong) == pytest.approx(threshold / scale, rel=1e-5)
    assert norm64(wrong) < min(threshold, true_norm) / 100

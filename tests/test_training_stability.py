"""Every adaptive preset keeps training stable through gradient spikes that make SGD diverge.

The task: a small Flax MLP regresses ``y = sin(x·w) + x·w / 2`` with SGD and momentum at a learning
rate that trains well on ordinary batches. A few outlier batches have inputs 30x larger; their
gradients are ~1000x the usual norm, and one unclipped step on the first of them sends the loss to
NaN. Each preset, with hyperparameters suited to this model, must clip those steps and end below
the loss it started from. Every run is one jitted ``lax.scan`` over the whole training.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from harness import TransformCase, parametrize_cases

import clipchain

STEPS = 200
BATCH = 32
DIM = 8
OUTLIER_STEPS = (40, 90, 140)
OUTLIER_SCALE = 30.0
LEARNING_RATE = 0.05
MOMENTUM = 0.9


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32)(x))
    x = nn.relu(nn.Dense(32)(x))
    return nn.Dense(1)(x)[..., 0]


MODEL = MLP()


def target(x, w):
  return np.sin(x @ w) + 0.5 * (x @ w)


@functools.cache
def data():
  """Training batches ``(STEPS, BATCH, DIM)`` with outlier batches, and a clean evaluation set."""
  rng = np.random.default_rng(0)
  w = rng.normal(size=DIM)
  x = rng.normal(size=(STEPS, BATCH, DIM))
  x[list(OUTLIER_STEPS)] *= OUTLIER_SCALE
  x_eval = rng.normal(size=(256, DIM))
  arrays = (x, target(x, w), x_eval, target(x_eval, w))
  return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


def loss_fn(params, x, y):
  return jnp.mean((MODEL.apply(params, x) - y) ** 2)


def initial_params():
  return MODEL.init(jax.random.key(0), jnp.zeros((1, DIM)))


def train(clip: optax.GradientTransformation | None, name: str | None = None):
  """Evaluation loss after every step and, with a clip, the fraction it clipped at every step."""
  sgd = optax.sgd(LEARNING_RATE, momentum=MOMENTUM)
  tx = sgd if clip is None else optax.chain(clip, sgd)
  x, y, x_eval, y_eval = data()

  @jax.jit
  def run(params):
    def step(carry, batch):
      params, state = carry
      grads = jax.grad(loss_fn)(params, *batch)
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
      fraction = 0.0 if clip is None else clipchain.stats(state)[f"{name}/clipped_fraction"]
      return (params, state), (loss_fn(params, x_eval, y_eval), fraction)

    _, (losses, fractions) = jax.lax.scan(step, (params, tx.init(params)), (x, y))
    return losses, fractions

  params = initial_params()
  losses, fractions = run(params)
  return float(loss_fn(params, x_eval, y_eval)), np.asarray(losses), np.asarray(fractions)


@dataclasses.dataclass(frozen=True)
class Case(TransformCase):
  """A clipping transform and the name it reports under."""

  name: str


CASES = [
  # AGC clips every update relative to the weights: with SGD, lambda * lr bounds each relative step.
  Case("adaptive_grad_clip", lambda: clipchain.adaptive_grad_clip(0.05), "adaptive_grad_clip"),
  Case("autoclip", lambda: clipchain.autoclip(), "autoclip"),
  Case("autoclip_layer", lambda: clipchain.autoclip(granularity="layer"), "autoclip"),
  # Without max_grad_norm, so that the z-score alone has to catch the spikes.
  Case("zclip", lambda: clipchain.zclip(max_grad_norm=None), "zclip"),
  Case("zclip_layer", lambda: clipchain.zclip(max_grad_norm=None, granularity="layer"), "zclip"),
  Case("quantile_clip", lambda: clipchain.quantile_clip(), "quantile_clip"),
  # A warmup shorter than the run's, so that the outliers meet the relative (EMA) phase.
  Case("adagc", lambda: clipchain.adagc(warmup_steps=10), "adagc"),
  Case(
    "adagc_global",
    lambda: clipchain.clip_norm(
      clipchain.thresholds.EMARatio(warmup_steps=10), granularity="global", name="adagc_global"
    ),
    "adagc_global",
  ),
  # SPAM's 5000 (values up to ~70x their RMS) suits Adam, whose steps do not grow with the
  # gradient; before plain SGD such values still make 70x steps, so clip at 10x the RMS.
  Case("spam_clip", lambda: clipchain.spam_clip(100.0, clip_statistics=True), "spam_clip"),
]


def test_unclipped_training_diverges_at_the_first_outlier_batch():
  initial, losses, _ = train(None)
  first = OUTLIER_STEPS[0]
  # The learning rate is a good one on ordinary batches ...
  assert np.all(np.isfinite(losses[:first])) and losses[first - 1] < 0.2 * initial
  # ... and one outlier batch is enough to make training diverge for good.
  assert losses[first] > 1e3 * initial
  assert not np.isfinite(losses[-1])


@parametrize_cases(CASES)
def test_clipped_training_is_stable(case):
  initial, losses, fractions = train(case.make(), case.name)
  assert np.all(np.isfinite(losses)), np.flatnonzero(~np.isfinite(losses))[:5]
  assert losses.max() < 2 * initial, losses.max()
  assert losses[-1] < 0.5 * initial, (initial, losses[-1])
  # It is the clip that saves the run: each outlier step was clipped.
  assert np.all(fractions[list(OUTLIER_STEPS)] > 0), fractions[list(OUTLIER_STEPS)]

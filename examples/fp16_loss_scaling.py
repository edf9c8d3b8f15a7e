"""Trains a small Flax MLP in float16 with a dynamic loss scale and a guarded, clipped optimizer.

The order inside one step:

1. scale the loss (``jmp.DynamicLossScale``), so that small float16 gradients do not underflow;
2. differentiate: a float16 backward pass whose scaled values overflow yields an Inf or a NaN;
3. **unscale** the gradients (float32, the parameters' dtype);
4. guard and clip the true gradient: ``skip_nonfinite(chain(clip_by_global_norm, adam))`` skips an
   overflowed step without a trace and clips the others against a threshold on the true norm;
5. adjust the loss scale from the guard's decision: halve it after a skipped step, double it after
   ``period`` applied ones.

Clipping before step 3 would clip the scaled gradient, whose norm is ``loss scale`` times the true
one: the clip would engage on nearly every step and, once unscaled, leave an update ``loss scale``
times smaller than the threshold allows (``tests/test_fp16_loss_scaling.py`` shows it).

Run with ``python examples/fp16_loss_scaling.py`` (needs ``jmp``, in the test extras).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import jmp
import optax

import clipchain


class MLP(nn.Module):
  """float16 compute, float32 parameters."""

  @nn.compact
  def __call__(self, x):
    dense = lambda features: nn.Dense(features, dtype=jnp.float16, param_dtype=jnp.float32)
    x = nn.gelu(dense(64)(x.astype(jnp.float16)))
    return dense(1)(x)


def make_optimizer(max_norm: float = 1.0, learning_rate: float = 3e-3):
  return clipchain.skip_nonfinite(
    optax.chain(clipchain.clip_by_global_norm(max_norm), optax.adam(learning_rate))
  )


def make_data(steps: int, batch: int = 32, features: int = 8, seed: int = 0):
  xs = jax.random.normal(jax.random.PRNGKey(seed), (steps, batch, features))
  return xs, jnp.sin(xs.sum(-1, keepdims=True))


def scaled_grads(model, params, x, y, loss_scale: jmp.DynamicLossScale):
  """The gradient of the scaled loss (still scaled), and the unscaled loss."""

  def scaled_loss(p):
    loss = jnp.mean((model.apply(p, x).astype(jnp.float32) - y) ** 2)
    return loss_scale.scale(loss), loss

  return jax.grad(scaled_loss, has_aux=True)(params)


def make_train_step(model, tx):
  @jax.jit
  def train_step(params, opt_state, loss_scale, x, y):
    grads, loss = scaled_grads(model, params, x, y, loss_scale)
    grads = loss_scale.unscale(grads)  # unscale first ...
    updates, opt_state = tx.update(grads, opt_state, params, loss=loss)  # ... then guard and clip
    params = optax.apply_updates(params, updates)
    # The guard's decision drives the loss scale: one decision per step, taken in the compiled
    # step (the same flag as clipchain.stats(opt_state)["skip_nonfinite/skipped"]).
    loss_scale = loss_scale.adjust(~opt_state.skipped)
    return params, opt_state, loss_scale, loss

  return train_step


@dataclasses.dataclass
class History:
  """Per step: the loss, the loss scale the step used, whether it was skipped, and the
  parameters after it (``params[0]`` are the initial ones)."""

  loss: list[float] = dataclasses.field(default_factory=list)
  loss_scale: list[float] = dataclasses.field(default_factory=list)
  skipped: list[bool] = dataclasses.field(default_factory=list)
  params: list = dataclasses.field(default_factory=list)


def train(
  steps: int = 200, *, initial_scale: float = 2.0**15, period: int = 50, seed: int = 0
) -> History:
  xs, ys = make_data(steps, seed=seed)
  model = MLP()
  params = model.init(jax.random.PRNGKey(seed + 1), xs[0])
  tx = make_optimizer()
  opt_state = tx.init(params)
  loss_scale = jmp.DynamicLossScale(jnp.asarray(initial_scale, jnp.float32), period=period)
  train_step = make_train_step(model, tx)
  history = History(params=[params])
  for i in range(steps):
    history.loss_scale.append(float(loss_scale.loss_scale))
    params, opt_state, loss_scale, loss = train_step(params, opt_state, loss_scale, xs[i], ys[i])
    history.loss.append(float(loss))
    history.skipped.append(bool(clipchain.stats(opt_state)["skip_nonfinite/skipped"]))
    history.params.append(params)
  return history


def main() -> None:
  history = train(initial_scale=2.0**24)
  print(f"{'step':>4} {'loss':>10} {'loss scale':>11} {'skipped':>8}")
  for i, (loss, scale, skipped) in enumerate(
    zip(history.loss, history.loss_scale, history.skipped)
  ):
    if i % 20 == 0 or skipped:
      print(f"{i:>4} {loss:>10.4f} {scale:>11.0f} {'yes' if skipped else 'no':>8}")


if __name__ == "__main__":
  main()

"""A guard as a whole training step (``clipchain.guarded_step``) in Flax linen and NNX.

A guard shaped as a transform returns updates for the caller to apply, so it computes the update
before knowing whether to keep it and then selects between the new and the old optimizer state:
on XLA's CPU backend that costs ~3x an Adam step. ``guarded_step(guard)`` owns the application:
it measures the gradient once, decides, and runs the update and ``apply_updates`` under one
``lax.cond`` (the cost of the clip alone). The state is ``guard.init(params)``'s, so checkpoints
and ``clipchain.stats`` are the same either way. Adopting it is one method in each framework:

* linen: a ``TrainState`` whose ``apply_gradients`` calls the guarded step;
* NNX: an ``nnx.Optimizer`` whose ``update`` does.

  python examples/guarded_step.py
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.training import train_state

import clipchain


def make_guard(learning_rate: float = 1e-2) -> optax.GradientTransformation:
  """Skip a step whose gradient or loss is non-finite, or whose loss spikes."""
  clipped_adam = optax.chain(clipchain.clip_by_global_norm(1.0), optax.adam(learning_rate))
  return clipchain.skip_spikes(
    clipchain.skip_nonfinite(clipped_adam), watch=("loss",), window=16, min_history=4
  )


# Flax linen ------------------------------------------------------------------------------------


class GuardedTrainState(train_state.TrainState):
  """A ``TrainState`` whose ``tx`` is a guard, applied by :func:`clipchain.guarded_step`."""

  def apply_gradients(self, *, grads, **kwargs):
    params, opt_state = clipchain.guarded_step(self.tx)(
      self.params, self.opt_state, grads, **kwargs
    )
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(1)(nn.gelu(nn.Dense(32)(x)))[..., 0]


def make_train_state(key) -> GuardedTrainState:
  model = MLP()
  params = model.init(key, jnp.zeros((1, 4)))
  return GuardedTrainState.create(apply_fn=model.apply, params=params, tx=make_guard())


@jax.jit
def linen_step(state: GuardedTrainState, x, y):
  def loss_fn(params):
    return jnp.mean((state.apply_fn(params, x) - y) ** 2)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  state = state.apply_gradients(grads=grads, loss=loss)
  return state, {"loss": loss, **clipchain.stats(state.opt_state)}


# Flax NNX --------------------------------------------------------------------------------------


class GuardedOptimizer(nnx.Optimizer):
  """An ``nnx.Optimizer`` whose ``tx`` is a guard, applied by :func:`clipchain.guarded_step`."""

  def update(self, model, grads, /, **kwargs):
    params = nnx.as_pure(nnx.state(model, self.wrt, graph=self.graph))
    grads = nnx.as_pure(nnx.state(grads, self.wrt, graph=self.graph))
    step = clipchain.guarded_step(self.tx)
    params, opt_state = step(params, nnx.as_pure(self.opt_state), grads, **nnx.as_pure(kwargs))
    nnx.update(model, params)
    nnx.update(self.opt_state, nnx.state(opt_state, graph=self.graph))
    self.step[...] += 1


class NNXMLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(4, 32, rngs=rngs)
    self.out = nnx.Linear(32, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.gelu(self.hidden(x)))[..., 0]


@nnx.jit
def nnx_step(model: NNXMLP, optimizer: GuardedOptimizer, x, y):
  loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
  optimizer.update(model, grads, loss=loss)
  return {"loss": loss, **clipchain.stats(optimizer.opt_state)}


# The same data for both --------------------------------------------------------------------------


def data(steps: int, spike_step: int, nan_step: int):
  """Batches of a smooth regression; one with its labels x100 (a loss spike), one with a NaN."""
  xs = jax.random.normal(jax.random.PRNGKey(1), (steps, 16, 4))
  ys = jnp.sin(xs.sum(-1))
  ys = ys.at[spike_step].multiply(100.0)
  ys = ys.at[nan_step, 0].set(jnp.nan)
  return xs, ys


def main(steps: int = 40, spike_step: int = 30, nan_step: int = 20) -> dict[str, list[dict]]:
  xs, ys = data(steps, spike_step, nan_step)
  state = make_train_state(jax.random.PRNGKey(0))
  model = NNXMLP(nnx.Rngs(0))
  optimizer = GuardedOptimizer(model, make_guard(), wrt=nnx.Param)
  logs: dict[str, list[dict]] = {"linen": [], "nnx": []}
  for i in range(steps):
    state, linen_stats = linen_step(state, xs[i], ys[i])
    nnx_stats = nnx_step(model, optimizer, xs[i], ys[i])
    for name, stats in (("linen", linen_stats), ("nnx", nnx_stats)):
      logs[name].append({k: float(v) for k, v in stats.items()})
    print(
      f"step {i:2d} loss {logs['linen'][-1]['loss']:9.4f} / {logs['nnx'][-1]['loss']:9.4f}"
      f" skipped {int(logs['linen'][-1]['skip_spikes/skipped'])}"
      f" / {int(logs['nnx'][-1]['skip_spikes/skipped'])}"
    )
  return logs


if __name__ == "__main__":
  main()

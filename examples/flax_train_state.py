"""clipchain with Flax linen's ``TrainState``: a clip, statistics logged every step, and a guard.

``TrainState.apply_gradients(grads=...)`` calls ``tx.update(grads, opt_state, params)`` and has no
way to pass ``loss=``; a guard that watches the loss (``skip_spikes(watch=("loss",))``) needs the
three lines of a custom step instead, shown in ``train_step``. The statistics come out of the
optimizer state inside ``jit``: no norm is computed twice.

  python examples/flax_train_state.py
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

import clipchain


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(1)(nn.gelu(nn.Dense(32)(x)))[..., 0]


def make_state(key, learning_rate=1e-2) -> train_state.TrainState:
  model = MLP()
  params = model.init(key, jnp.zeros((1, 4)))
  tx = clipchain.skip_spikes(
    optax.chain(clipchain.clip_by_global_norm(1.0), optax.adam(learning_rate)),
    watch=("grad_norm", "loss"),
    window=16,
    min_history=4,
  )
  return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


@jax.jit
def train_step(state: train_state.TrainState, x, y):
  def loss_fn(params):
    return jnp.mean((state.apply_fn(params, x) - y) ** 2)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  # apply_gradients cannot forward loss=: the same update, with the loss for the guard.
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params, loss=loss)
  state = state.replace(
    step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
  )
  return state, {"loss": loss, **clipchain.stats(state.opt_state)}


def main(steps: int = 40, spike_step: int = 30) -> list[dict]:
  key_data, key_init = jax.random.split(jax.random.PRNGKey(0))
  xs = jax.random.normal(key_data, (steps, 16, 4))
  ys = jnp.sin(xs.sum(-1))
  ys = ys.at[spike_step].multiply(100.0)  # one corrupted batch: its loss spikes
  state = make_state(key_init)
  logs = []
  for i in range(steps):
    state, stats = train_step(state, xs[i], ys[i])
    logs.append({k: float(v) for k, v in stats.items()})
    print(
      f"step {i:2d} loss {logs[-1]['loss']:9.4f} norm {logs[-1]['skip_spikes/grad_norm']:8.3f}"
      f" skipped {int(logs[-1]['skip_spikes/skipped'])}"
    )
  return logs


if __name__ == "__main__":
  main()

"""clipchain with Flax NNX: ``nnx.Optimizer(model, tx, wrt=nnx.Param)``, ``loss=`` forwarded.

``nnx.Optimizer.update(model, grads, **kwargs)`` passes its keyword arguments to ``tx.update``, so a
guard that watches the loss gets it with ``optimizer.update(model, grads, loss=loss)``. The
statistics are read from ``optimizer.opt_state`` inside the jitted step.

  python examples/nnx_optimizer.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import clipchain


class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(4, 32, rngs=rngs)
    self.out = nnx.Linear(32, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.gelu(self.hidden(x)))[..., 0]


def make(seed: int = 0, learning_rate: float = 1e-2):
  model = MLP(nnx.Rngs(seed))
  tx = clipchain.skip_spikes(
    optax.chain(clipchain.clip_by_layer_norm(1.0, layers="module"), optax.adam(learning_rate)),
    watch=("grad_norm", "loss"),
    window=16,
    min_history=4,
  )
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, x, y):
  loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
  optimizer.update(model, grads, loss=loss)  # forwarded to the guard
  return {"loss": loss, **clipchain.stats(optimizer.opt_state)}


def main(steps: int = 40, spike_step: int = 30) -> list[dict]:
  xs = jax.random.normal(jax.random.PRNGKey(1), (steps, 16, 4))
  ys = jnp.sin(xs.sum(-1))
  ys = ys.at[spike_step].multiply(100.0)
  model, optimizer = make()
  logs = []
  for i in range(steps):
    stats = train_step(model, optimizer, xs[i], ys[i])
    logs.append({k: float(v) for k, v in stats.items()})
    print(
      f"step {i:2d} loss {logs[-1]['loss']:9.4f} skipped {int(logs[-1]['skip_spikes/skipped'])}"
    )
  return logs


if __name__ == "__main__":
  main()

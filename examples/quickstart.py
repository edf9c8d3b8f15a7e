"""Trains a small Flax MLP with clipchain's global-norm clipping and prints its statistics.

Run with ``python examples/quickstart.py``. The regression target has a few outlier batches
whose gradients spike; the statistics show the clip engaging on exactly those steps.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import clipchain


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(64)(x))
    x = nn.gelu(nn.Dense(64)(x))
    return nn.Dense(1)(x)


def main(steps: int = 60, max_norm: float = 5.0) -> None:
  key_data, key_init = jax.random.split(jax.random.PRNGKey(0))
  xs = jax.random.normal(key_data, (steps, 32, 8))
  ys = jnp.sin(xs.sum(-1, keepdims=True))
  # Every 15th batch carries corrupted targets: a gradient spike a clip should absorb.
  ys = ys.at[::15].multiply(50.0)

  model = MLP()
  params = model.init(key_init, xs[0])
  tx = optax.chain(clipchain.clip_by_global_norm(max_norm), optax.adam(3e-3))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean((model.apply(p, x) - y) ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, clipchain.stats(opt_state)

  print(f"{'step':>4} {'loss':>10} {'grad norm':>10} {'clipped':>8}")
  for i in range(steps):
    params, opt_state, loss, stats = step(params, opt_state, xs[i], ys[i])
    if i % 5 == 0 or float(stats["clip_by_global_norm/clipped_fraction"]) > 0:
      print(
        f"{i:>4} {float(loss):>10.4f} {float(stats['clip_by_global_norm/norm']):>10.3f} "
        f"{'yes' if float(stats['clip_by_global_norm/clipped_fraction']) else 'no':>8}"
      )


if __name__ == "__main__":
  main()

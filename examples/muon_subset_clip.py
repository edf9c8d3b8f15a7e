"""Muon with a clip of the leaves it does not orthogonalise, reporting the whole tree's norm.

``optax.contrib.muon`` orthogonalises every matrix (its update's scale is fixed by Newton-Schulz,
whatever the gradient's) and gives the other leaves (biases, norms, 3-d kernels) to AdamW. A
global clip over the whole tree rescales Muon's matrices too, and a clip after Muon divides its
update by that update's own norm; what Levanter's and xtuner's Muon configurations do instead is
clip inside the AdamW branch only. ``mask=`` says the same in one line: the clip measures and clips
the selected leaves, passes the others through untouched, and reports ``norm`` (the clipped
subset's) beside ``total_norm`` (the whole gradient's, from the same read), so the logged norm is
still the one a guard or a dashboard expects.

  python examples/muon_subset_clip.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import clipchain


def not_orthogonalised(params):
  """The leaves optax.contrib.muon gives its AdamW: every one that is not a matrix."""
  return jax.tree.map(lambda x: x.ndim != 2, params)


def make_tx(lr: float = 0.02, max_norm: float = 1.0) -> optax.GradientTransformation:
  return optax.chain(
    clipchain.clip_by_global_norm(max_norm, mask=not_orthogonalised), optax.contrib.muon(lr)
  )


def init_params(key: jax.Array) -> dict:
  k1, k2 = jax.random.split(key)
  return {
    "hidden": {"kernel": jax.random.normal(k1, (8, 16)) / 8**0.5, "bias": jnp.zeros(16)},
    "out": {"kernel": jax.random.normal(k2, (16, 1)) / 4.0, "bias": jnp.zeros(1)},
  }


def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  return jnp.mean((h @ params["out"]["kernel"] + params["out"]["bias"] - y) ** 2)


def main(steps: int = 20, max_norm: float = 0.05) -> list[dict[str, float]]:
  tx = make_tx(max_norm=max_norm)
  params = init_params(jax.random.key(0))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    metrics = {"loss": loss, **clipchain.stats(opt_state)}
    return optax.apply_updates(params, updates), opt_state, metrics

  log = []
  for t in range(steps):
    x = jax.random.normal(jax.random.fold_in(jax.random.key(1), t), (32, 8))
    y = jnp.sin(x.sum(axis=1, keepdims=True))
    params, opt_state, metrics = step(params, opt_state, x, y)
    log.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    subset, total = log[-1]["clip_by_global_norm/norm"], log[-1]["clip_by_global_norm/total_norm"]
    print(f"step {t:2d}  loss {log[-1]['loss']:.4f}  subset norm {subset:.4f}  total {total:.4f}")
  return log


if __name__ == "__main__":
  main()

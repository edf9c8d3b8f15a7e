"""Gradient accumulation with ``optax.MultiSteps``: clip the accumulated batch, guard it too.

Put the clip *inside* ``MultiSteps``, so that it clips the mean gradient of the ``k`` micro-batches
(the batch the model is trained on), not each micro-batch, and the guard inside it too, around the
clip and the optimizer, where it judges the accumulated update. A NaN micro-batch must be kept out
of the accumulator itself: ``MultiSteps`` resets its accumulator by multiplying it by 0, so a NaN
that got in would stay in every later window (measured: every update after it skipped). Its
``should_skip_update_fn=optax.skip_not_finite`` drops such a micro-batch before it is accumulated;
the guard inside then catches what only the accumulated update shows (a sum that overflows, or a
spike with ``skip_spikes``).

  python examples/gradient_accumulation.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import clipchain

ACCUMULATE = 4


def make_tx() -> optax.MultiSteps:
  inner = clipchain.skip_nonfinite(
    optax.chain(clipchain.clip_by_global_norm(1.0), optax.adam(1e-2))
  )
  # A NaN micro-batch must not enter the accumulator: MultiSteps would keep it there for good
  # (the accumulator is reset by multiplying it by 0, and NaN * 0 is NaN).
  return optax.MultiSteps(
    inner, every_k_schedule=ACCUMULATE, should_skip_update_fn=optax.skip_not_finite
  )


def micro_batch(i: int, nan_at: int | None):
  x = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(0), i), (8, 4))
  y = x @ jnp.array([1.0, -1.0, 2.0, 0.5])
  if i == nan_at:
    y = y.at[0].set(jnp.nan)  # one corrupted example in one micro-batch
  return x, y


def main(micro_steps: int = 24, nan_at: int | None = 9):
  tx = make_tx()
  params = {"w": jnp.zeros(4)}
  state = tx.init(params)

  @jax.jit
  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean((x @ p["w"] - y) ** 2))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  log = []
  for i in range(micro_steps):
    params, state, loss = step(params, state, *micro_batch(i, nan_at))
    stats = clipchain.stats(state)
    log.append({"loss": float(loss), **{k: float(v) for k, v in stats.items()}})
    print(
      f"micro-step {i:2d} loss {float(loss):8.4f} skipped {int(log[-1]['skip_nonfinite/skipped'])}"
    )
  return params, state, log


if __name__ == "__main__":
  main()

"""A clip threshold that changes during training: a schedule, or ``optax.inject_hyperparams``.

Two ways, both inside ``jit`` with nothing recompiled:

* a schedule as the threshold: ``clip_by_global_norm(optax.linear_schedule(...))`` follows it by the
  clip's own step count;
* ``optax.inject_hyperparams(clipchain.clip_by_global_norm)(max_norm=...)`` keeps the threshold in
  the state, where the training loop can set it (a value, or a schedule injected the same way).

Every preset works under ``inject_hyperparams`` with its defaults; only ``adaptive_grad_clip``'s
``axis`` and ``stacked_axes`` (they choose axes, which must be known when tracing) need
``static_args=("axis", "stacked_axes")``, and a ``mask=`` callable needs ``static_args=("mask",)``
(``inject_hyperparams`` would call it as a schedule; clipchain refuses what that gives).

  python examples/threshold_schedule.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import clipchain


def scheduled(steps: int = 10) -> list[float]:
  """The threshold follows a warm-up schedule from 5.0 down to 1.0 over ``steps`` updates."""
  tx = clipchain.clip_by_global_norm(optax.linear_schedule(5.0, 1.0, steps))
  grads = {"w": jnp.full((4,), 10.0)}
  state = tx.init(grads)
  update = jax.jit(tx.update)
  thresholds = []
  for _ in range(steps + 2):
    _, state = update(grads, state)
    thresholds.append(float(clipchain.stats(state)["clip_by_global_norm/threshold"]))
  return thresholds


def injected() -> list[float]:
  """The threshold lives in the state: the loop lowers it after a few steps."""
  tx = optax.chain(
    optax.inject_hyperparams(clipchain.clip_by_global_norm)(max_norm=4.0), optax.sgd(0.1)
  )
  params = {"w": jnp.zeros(4)}
  state = tx.init(params)
  step = jax.jit(lambda g, s: tx.update(g, s, params))
  norms_after = []
  for i in range(6):
    if i == 3:
      state[0].hyperparams["max_norm"] = jnp.asarray(1.0)  # tighten the clip mid-run
    updates, state = step({"w": jnp.full((4,), 10.0)}, state)
    norms_after.append(float(jnp.linalg.norm(updates["w"])) / 0.1)
  return norms_after


def main():
  print("scheduled thresholds:", [round(t, 2) for t in scheduled()])
  print("norms after the injected clip:", [round(n, 2) for n in injected()])


if __name__ == "__main__":
  main()

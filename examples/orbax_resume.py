"""Checkpoint and resume a training run whose optimizer holds clipchain states, with Orbax.

The whole training state (params, optax state with an adaptive clip's history and a guard's
window, step) is saved by an ``orbax.checkpoint.CheckpointManager`` and restored into a target of
the same structure; the resumed run is bit-identical to one that never stopped. Each clipchain
state records what gives its arrays their meaning (its settings), so restoring into a transform
built with other settings fails in Orbax instead of silently reinterpreting the arrays.

  python examples/orbax_resume.py /tmp/ckpt
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp

import clipchain

FEATURES = 8


def make_tx() -> optax.GradientTransformation:
  return clipchain.skip_nonfinite(
    optax.chain(clipchain.zclip(warmup_steps=5), optax.adamw(1e-2)), max_consecutive=3
  )


def init(seed: int = 0):
  params = {"w": 0.1 * jax.random.normal(jax.random.PRNGKey(seed), (FEATURES,)), "b": jnp.zeros(())}
  return {"params": params, "opt_state": make_tx().init(params), "step": jnp.zeros((), jnp.int32)}


def batch(step):
  x = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(1), step), (32, FEATURES))
  return x, x @ jnp.arange(1.0, FEATURES + 1) + 0.5


@jax.jit
def train_step(state):
  tx = make_tx()
  x, y = batch(state["step"])
  loss, grads = jax.value_and_grad(lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2))(
    state["params"]
  )
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, loss


def train(state, steps: int):
  for _ in range(steps):
    state, _ = train_step(state)
  return state


def main(directory: str, steps: int = 20, stop_at: int = 12) -> tuple[dict, dict]:
  """Trains ``stop_at`` steps, saves, restores into a fresh target, trains the rest; returns the
  resumed final state and that of an uninterrupted run."""
  directory = pathlib.Path(directory).resolve()
  options = ocp.CheckpointManagerOptions(max_to_keep=2)
  with ocp.CheckpointManager(directory, options=options) as manager:
    state = train(init(), stop_at)
    manager.save(stop_at, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()

  with ocp.CheckpointManager(directory, options=options) as manager:
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, init())
    restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(target))
  resumed = train(restored, steps - stop_at)
  uninterrupted = train(init(), steps)
  stats = clipchain.stats(resumed["opt_state"])
  print(f"resumed at step {int(restored['step'])}, ran to {int(resumed['step'])}")
  print(f"zclip mean after resume: {float(stats['zclip/mean']):.4f}")
  return resumed, uninterrupted


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("directory")
  main(parser.parse_args().directory)

"""Data-parallel training with clipping and a guard, on every local device and across hosts.

One program for one device, many devices, or many processes: the batch is split across a mesh of
all devices with ``jit`` and ``NamedSharding``, and the compiler turns the global-norm clip into one
all-reduce, so no ``axis_name`` is needed. The clip and the skip decision live in the compiled step:
every device, on every host, computes the same norm and takes the same decision.

On one machine::

  python examples/data_parallel.py
  JAX_NUM_CPU_DEVICES=4 python examples/data_parallel.py    # 4 simulated CPU devices

Across processes (here two on one machine, each with 2 CPU devices: a 4-device mesh), start one
process per host with the same coordinator address and its own process id::

  export CLIPCHAIN_COORDINATOR=127.0.0.1:12345 CLIPCHAIN_NUM_PROCESSES=2 JAX_NUM_CPU_DEVICES=2
  CLIPCHAIN_PROCESS_ID=0 python examples/data_parallel.py &
  CLIPCHAIN_PROCESS_ID=1 python examples/data_parallel.py

``CLIPCHAIN_COORDINATOR`` is ``host:port`` of process 0, reachable from every host. Without it the
script runs as a single process. Only process 0 prints. Step ``--nan-step`` feeds one NaN target
to the last process: the loss and the gradient are NaN on every device after the all-reduce, and
``skip_nonfinite`` skips that step everywhere. See ``docs/distributed.md``.
"""

from __future__ import annotations

import argparse
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import clipchain

FEATURES = 8


def initialize_distributed() -> bool:
  """Joins the processes named by the ``CLIPCHAIN_*`` environment variables, if any."""
  coordinator = os.environ.get("CLIPCHAIN_COORDINATOR")
  if not coordinator:
    return False
  jax.distributed.initialize(
    coordinator_address=coordinator,
    num_processes=int(os.environ["CLIPCHAIN_NUM_PROCESSES"]),
    process_id=int(os.environ["CLIPCHAIN_PROCESS_ID"]),
    initialization_timeout=60,
  )
  return True


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(32)(x))
    x = nn.gelu(nn.Dense(32)(x))
    return nn.Dense(1)(x)


def make_optimizer(clip: str, max_norm: float, learning_rate: float):
  if clip == "global":
    clipper = clipchain.clip_by_global_norm(max_norm, name="clip")
  else:
    clipper = clipchain.zclip(warmup_steps=5, max_grad_norm=max_norm, name="clip")
  return clipchain.skip_nonfinite(optax.chain(clipper, optax.adam(learning_rate)))


def local_batch(step: int, global_batch: int, nan_step: int):
  """This process's rows of the global batch of ``step``.

  The synthetic batch is drawn whole, from a seed and the step, and sliced, so that every process
  count sees the same global batch; a real input pipeline reads only this process's rows.
  """
  rng = np.random.default_rng((0, step))
  x = rng.standard_normal((global_batch, FEATURES), dtype=np.float32)
  y = np.sin(x.sum(-1, keepdims=True))
  if step % 10 == 7:  # an outlier batch: a gradient spike the clip absorbs
    y *= 30.0
  if step == nan_step:  # one bad example, in the last process's rows
    y[-1] = np.nan
  rows = global_batch // jax.process_count()
  start = jax.process_index() * rows
  return x[start : start + rows], y[start : start + rows]


def train(steps: int, global_batch: int, clip: str, max_norm: float, nan_step: int):
  """Trains the MLP; returns the final parameters and, per step, the statistics."""
  if global_batch % jax.device_count():
    raise ValueError(f"--batch-size {global_batch} must divide by {jax.device_count()} devices.")
  # Auto axes: the compiler picks every intermediate sharding, so any model code runs unchanged
  # (jax.make_mesh defaults to Explicit axes, where shardings are part of each array's type).
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  replicated = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P("data"))

  model = MLP()
  tx = make_optimizer(clip, max_norm, learning_rate=3e-3)

  def init():
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, FEATURES)))
    return params, tx.init(params)

  params, opt_state = jax.jit(init, out_shardings=replicated)()

  def loss_fn(params, x, y):
    return jnp.mean((model.apply(params, x) - y) ** 2)

  def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)  # grads: one all-reduce, by XLA
    updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
    params = optax.apply_updates(params, updates)
    # The guard's grad_norm is this step's; a clip's statistics roll back with a skipped step.
    stats = {"loss": loss, "grad_norm": opt_state.grad_norm, **clipchain.stats(opt_state)}
    return params, opt_state, stats

  train_step = jax.jit(train_step, out_shardings=replicated, donate_argnums=(0, 1))
  history = []
  for step in range(steps):
    x, y = local_batch(step, global_batch, nan_step)
    # Each process hands over its own rows; together they form one global array split on "data".
    x = jax.make_array_from_process_local_data(data, x)
    y = jax.make_array_from_process_local_data(data, y)
    params, opt_state, stats = train_step(params, opt_state, x, y)
    history.append(stats)
  # The statistics are replicated: every process holds their value and may read it.
  history = {k: np.stack([np.asarray(h[k]) for h in history]) for k in history[0]}
  return jax.tree.map(np.asarray, params), history


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--batch-size", type=int, default=64, help="global, over all devices")
  parser.add_argument(
    "--clip",
    choices=("global", "zclip"),
    default="global",
    help="clip_by_global_norm(max_norm), or zclip capped at max_norm",
  )
  parser.add_argument("--max-norm", type=float, default=2.0)
  parser.add_argument("--nan-step", type=int, default=25, help="the step with a NaN; -1: none")
  parser.add_argument("--out", help="write the final parameters and statistics to this .npz")
  args = parser.parse_args()

  distributed = initialize_distributed()
  try:
    params, history = train(args.steps, args.batch_size, args.clip, args.max_norm, args.nan_step)
    if jax.process_index() == 0:
      print(f"{jax.process_count()} process(es), {jax.device_count()} device(s)")
      print(f"{'step':>4} {'loss':>10} {'grad norm':>10} {'clipped':>8} {'skipped':>8}")
      for i in range(args.steps):
        clipped = history["clip/clipped_fraction"][i] > 0
        skipped = history["skip_nonfinite/skipped"][i] > 0
        if i % 5 == 0 or clipped or skipped:
          print(
            f"{i:>4} {history['loss'][i]:>10.4f} {history['grad_norm'][i]:>10.3f}"
            f" {'yes' if clipped else 'no':>8} {'yes' if skipped else 'no':>8}"
          )
    if args.out:
      flat = {
        "params/" + jax.tree_util.keystr(path, simple=True, separator="/"): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
      }
      np.savez(args.out, **flat, **{f"stats/{k}": v for k, v in history.items()})
  finally:
    if distributed:
      jax.distributed.shutdown()


if __name__ == "__main__":
  main()

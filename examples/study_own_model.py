"""Runs ``clipchain study`` on a model of your own: a Flax MLP on your data, as a ``Task``.

A ``Task`` is three functions: ``init(key) -> params``, ``loss(params, batch) -> scalar`` and
``batches(key, step) -> batch``. The study traces them once and ``vmap``-s them over learning rates
and seeds, so they must be pure JAX. Here the data are regression batches in which, during the
first 100 steps, one batch in ten has its targets scaled by 30: the kind of outlier that makes a
gradient spike::

  python examples/study_own_model.py --out my-study      # then open my-study/report.html
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipchain import study

FEATURES = 16


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(64)(x))
    x = nn.tanh(nn.Dense(64)(x))
    return nn.Dense(1)(x)[..., 0]


def make_task() -> study.Task:
  model = MLP()
  teacher = jax.random.normal(jax.random.PRNGKey(42), (FEATURES,))

  def init(key):
    return model.init(key, jnp.zeros((1, FEATURES)))

  def loss(params, batch):
    x, y = batch
    return jnp.mean((model.apply(params, x) - y) ** 2)

  def batches(key, step):
    x = jax.random.normal(jax.random.fold_in(key, step), (32, FEATURES))
    y = jnp.sin(x @ teacher)
    # In the first 100 steps every 10th batch carries targets 30 times too large.
    return x, jnp.where((step % 10 == 5) & (step < 100), 30.0 * y, y)

  def eval_batch(key):
    x = jax.random.normal(key, (256, FEATURES))
    return x, jnp.sin(x @ teacher)

  return study.Task(
    "my-mlp",
    init=init,
    loss=loss,
    batches=batches,
    eval_batch=eval_batch,
    target_loss=0.3,
    steps=200,
    description="A tanh MLP on sin(w·x) with outlier batches.",
  )


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=None, help="write results.json and the report here")
  parser.add_argument("--steps", type=int, default=200)
  args = parser.parse_args(argv)
  records = study.run(
    make_task(),
    strategies=["none", "global", "zclip"],
    optimizers=["sgd", "adam"],
    lrs={"sgd": [0.03, 0.3], "adam": [1e-3, 3e-2]},
    seeds=2,
    steps=args.steps,
    out=args.out,
  )
  for r in records:
    if not r["sweep"]:
      final = "diverged" if r["diverged"] else f"{r['final_loss']:.4f}"
      print(f"{r['optimizer']:>5} lr={r['lr']:<6g} seed={r['seed']} {r['strategy']:<7} {final}")
  return records


if __name__ == "__main__":
  main()

"""The built-in study tasks: shapes, determinism, and data that matches its definition."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipchain.study import tasks
from clipchain.study.task import Task

NAMES = ["rnn-adding", "lm", "heavy-tail", "outlier-batches"]


@functools.cache
def task(name: str) -> Task:
  return tasks.get_task(name)


def leaves_finite(tree) -> bool:
  return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(tree))


def test_registry():
  assert set(tasks.TASKS) == set(NAMES)
  for name in NAMES:
    t = task(name)
    assert isinstance(t, Task)
    assert t.name == name
    assert set(t.lrs) == {"sgd", "rmsprop", "adam", "adamw", "muon"}
    for grid in t.lrs.values():
      assert list(grid) == sorted(grid) and len(grid) >= 4
  with pytest.raises(ValueError, match="rnn-adding"):
    tasks.get_task("nope")


@pytest.mark.parametrize("name", NAMES)
def test_init_loss_and_grad_finite(name):
  t = task(name)

  # Jitted and vmapped over runs, as the study runs it: the functions must be pure JAX.
  @jax.jit
  def check(key):
    params = jax.vmap(t.init)(jax.random.split(key, 2))
    batch = t.batches(key, jnp.int32(0))
    loss, grads = jax.vmap(jax.value_and_grad(t.loss), in_axes=(0, None))(params, batch)
    eval_loss = jax.vmap(t.loss, in_axes=(0, None))(params, t.eval_batch(key))
    return loss, grads, eval_loss

  loss, grads, eval_loss = check(jax.random.key(0))
  chex.assert_shape(loss, (2,))
  assert leaves_finite(loss) and leaves_finite(grads) and leaves_finite(eval_loss)
  assert float(jnp.min(loss)) > t.target_loss  # the target is not met before training


@pytest.mark.parametrize("name", NAMES)
def test_batches_deterministic(name):
  t = task(name)
  key = jax.random.key(1)
  batches = jax.jit(t.batches)
  first = batches(key, jnp.int32(3))
  chex.assert_trees_all_equal(first, batches(key, jnp.int32(3)))
  other = batches(key, jnp.int32(4))
  assert any(
    not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(other))
  )


def test_adding_problem_targets():
  t = task("rnn-adding")
  batch = jax.device_get(t.batches(jax.random.key(2), jnp.int32(0)))
  inputs, targets = np.asarray(batch["inputs"]), np.asarray(batch["targets"])
  values, markers = inputs[..., 0], inputs[..., 1]
  half = values.shape[1] // 2
  assert np.all((values >= 0) & (values < 1))
  assert np.all(markers[:, :half].sum(1) == 1) and np.all(markers[:, half:].sum(1) == 1)
  expected = np.array([v[m == 1].sum() for v, m in zip(values, markers)])
  np.testing.assert_allclose(targets, expected, rtol=1e-6)


def test_markov_corpus_follows_its_chain():
  t = task("lm")
  transitions = tasks.markov_transitions()
  vocab = transitions.shape[0]
  tokens = jax.jit(jax.vmap(t.batches, in_axes=(None, 0)))(jax.random.key(3), jnp.arange(400))
  tokens = np.asarray(tokens).reshape(-1, tokens.shape[-1])
  assert tokens.min() >= 0 and tokens.max() < vocab
  a, b, c = (tokens[:, i : tokens.shape[1] - 2 + i].ravel() for i in range(3))
  counts = np.zeros_like(transitions)
  np.add.at(counts, (a, b, c), 1)
  # Compare the rows seen often enough for their frequencies to have settled.
  seen = counts.sum(-1)
  often = seen >= 200
  assert often.sum() > 50
  frequencies = counts[often] / seen[often, None]
  assert np.max(np.abs(frequencies - transitions[often])) < 0.15
  # The mean log-likelihood of the sampled tokens estimates the entropy rate: this also checks
  # that sequences start from the stationary distribution.
  nll = -np.mean(np.log(transitions[a, b, c]))
  assert abs(nll - tasks.markov_entropy_rate(transitions)) < 0.05


def test_entropy_rate_matches_eigenvector():
  transitions = tasks.markov_transitions()
  vocab = transitions.shape[0]
  # The pair chain (a, b) -> (b, c) as a dense matrix; its stationary law is the left eigenvector
  # of eigenvalue 1.
  pair = np.zeros((vocab * vocab, vocab * vocab))
  for a in range(vocab):
    for b in range(vocab):
      pair[a * vocab + b, b * vocab : (b + 1) * vocab] = transitions[a, b]
  eigenvalues, eigenvectors = np.linalg.eig(pair.T)
  stationary = np.real(eigenvectors[:, np.argmin(np.abs(eigenvalues - 1))])
  stationary /= stationary.sum()
  entropy = -np.sum(transitions * np.log(transitions), axis=-1).ravel()
  expected = float(stationary @ entropy)
  assert tasks.markov_entropy_rate(transitions) == pytest.approx(expected, rel=1e-6)
  assert task("lm").target_loss == pytest.approx(expected + 0.1, abs=1e-3)


def test_heavy_tail_noise_and_clean_eval():
  t = task("heavy-tail")
  teacher = tasks._teacher(16)

  @jax.jit
  def noise_of(key):
    batch = jax.vmap(t.batches, in_axes=(None, 0))(key, jnp.arange(300))
    return batch["targets"] - jax.vmap(teacher)(batch["inputs"])

  noise = np.asarray(noise_of(jax.random.key(4))).ravel()
  # Heavy-tailed: huge excess kurtosis and a largest residual far above the typical one (a
  # Gaussian sample of this size has a kurtosis near 3 and a max-to-median ratio near 6).
  kurtosis = np.mean(noise**4) / np.mean(noise**2) ** 2
  assert kurtosis > 30
  assert np.max(np.abs(noise)) / np.median(np.abs(noise)) > 20
  assert np.max(np.abs(noise)) <= 3.0 + 1e-6  # bounded, so the training loss stays meaningful
  clean = jax.jit(t.eval_batch)(jax.random.key(5))
  np.testing.assert_allclose(clean["targets"], teacher(clean["inputs"]), rtol=1e-5, atol=1e-5)


def test_outlier_batches_corrupt_one_label_on_rare_steps_after_the_clean_start():
  t = task("outlier-batches")
  batch = jax.jit(jax.vmap(t.batches, in_axes=(None, 0)))(jax.random.key(6), jnp.arange(4000))
  corrupted = np.asarray(batch["corrupted"])
  per_step = corrupted.sum(axis=1)
  assert set(np.unique(per_step)) == {0.0, 1.0}  # one example at most
  assert per_step[:50].sum() == 0  # the clean start
  share = per_step[50:].mean()
  assert 0.02 < share < 0.04  # 3 % of batches, 3950 steps: the binomial's 4-sigma band
  teacher = tasks._teacher(16)
  residual = np.asarray(batch["targets"]) - np.asarray(jax.vmap(teacher)(batch["inputs"]))
  np.testing.assert_array_less(np.abs(residual[corrupted == 0]), 1.0)  # noise 0.1
  np.testing.assert_allclose(np.abs(residual[corrupted == 1]), 100.0, atol=1.0)


def test_outlier_batches_report_the_clean_loss_and_train_on_every_example():
  """The value is the clean examples' mean squared error, the gradient that of all examples'
  (float64 NumPy through the model's last layer)."""
  t = task("outlier-batches")
  params = t.init(jax.random.key(7))
  # A readout that is not zero, so the gradient of every layer is not.
  params = jax.tree.map(lambda x: x + 0.1, params)
  batch = t.batches(jax.random.key(8), jnp.int32(0))
  batch = {**batch, "corrupted": batch["corrupted"].at[3].set(1.0)}
  batch["targets"] = batch["targets"].at[3].add(100.0)
  loss, grads = jax.value_and_grad(t.loss)(params, batch)
  model = tasks.DeepMLP(depth=3, zero_readout=True)
  hidden = batch["inputs"]
  for i in range(3):
    layer = params[f"hidden_{i}"]
    hidden = jnp.tanh(hidden @ layer["kernel"] + layer["bias"])
  hidden = np.asarray(hidden, np.float64)
  out = params["output"]
  prediction = hidden @ np.asarray(out["kernel"], np.float64)[:, 0] + float(out["bias"][0])
  errors = prediction - np.asarray(batch["targets"], np.float64)
  clean = np.asarray(batch["corrupted"]) == 0
  assert float(loss) == pytest.approx(np.mean(errors[clean] ** 2), rel=1e-5)
  expected_grad = 2.0 * hidden.T @ errors / errors.size
  np.testing.assert_allclose(grads["output"]["kernel"][:, 0], expected_grad, rtol=2e-4)
  assert np.allclose(
    model.apply({"params": params}, batch["inputs"]), prediction, rtol=1e-5, atol=1e-5
  )


def test_outlier_batches_spike_unclipped_adam_at_the_top_lr_and_zclip_does_not():
  from clipchain.study import metrics, run

  records = run(
    task("outlier-batches"),
    strategies=["none", "zclip"],
    optimizers=["adam"],
    lrs=[1e-3, 1e-2],
    seeds=3,
    steps=300,  # about 8 corrupted batches after the clean start
  )
  spikes = {(r["strategy"], r["lr"], r["seed"]): r["spike_count"] for r in records}
  assert all(spikes[("none", 1e-2, s)] >= 2 for s in range(3)), spikes
  assert all(spikes[("zclip", lr, s)] == 0 for lr in (1e-3, 1e-2) for s in range(3)), spikes
  assert all(spikes[("none", 1e-3, s)] == 0 for s in range(3)), spikes
  assert not any(r["diverged"] for r in records)
  finals = {(r["strategy"], r["lr"], r["seed"]): r["final_loss"] for r in records}
  assert all(finals[("zclip", 1e-2, s)] < 0.6 * finals[("none", 1e-2, s)] for s in range(3))
  assert metrics.SPIKE_WINDOW < 50  # the clean start is longer than the spike rule's window

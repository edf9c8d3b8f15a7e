"""examples/gradient_accumulation.py: a NaN micro-batch is dropped before it is accumulated, the
clip acts on the accumulated batch, and training goes on as if that micro-batch had never come."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from harness import script_fixture

import clipchain

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "gradient_accumulation.py"
recipe = script_fixture(_SCRIPT, "gradient_accumulation")


def _run(recipe, batches):
  tx = recipe.make_tx()
  params = {"w": jnp.zeros(4)}
  state = tx.init(params)
  for x, y in batches:
    grads = jax.grad(lambda p, x=x, y=y: jnp.mean((x @ p["w"] - y) ** 2))(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_a_nan_micro_batch_leaves_no_trace(recipe, capsys):
  params, _, log = recipe.main(micro_steps=24, nan_at=9)
  assert np.isnan(log[9]["loss"])
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))
  assert not any(entry["skip_nonfinite/skipped"] for entry in log)  # kept out before the guard
  # The same run without micro-batch 9 at all: the same parameters, bit for bit.
  clean = [recipe.micro_batch(i, None) for i in range(24) if i != 9]
  expected, _ = _run(recipe, clean)
  np.testing.assert_array_equal(params["w"], expected["w"])
  assert len(capsys.readouterr().out.splitlines()) == 24


def test_the_clip_sees_the_accumulated_gradient(recipe):
  batches = [recipe.micro_batch(i, None) for i in range(recipe.ACCUMULATE)]
  params = {"w": jnp.zeros(4)}
  _, state = _run(recipe, batches)
  grads = [
    jax.grad(lambda p, x=x, y=y: jnp.mean((x @ p["w"] - y) ** 2))(params)["w"] for x, y in batches
  ]
  mean_norm = float(jnp.linalg.norm(sum(grads) / len(grads)))
  stats = clipchain.stats(state)
  np.testing.assert_allclose(stats["clip_by_global_norm/norm"], mean_norm, rtol=1e-5)

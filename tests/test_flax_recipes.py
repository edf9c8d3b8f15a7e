"""The Flax recipes run as written: linen ``TrainState`` and NNX ``nnx.Optimizer``, with clipping,
statistics logged inside ``jit`` and a guard that watches the loss."""

import pathlib

import numpy as np
import pytest
from harness import script_fixture

_EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
train_state_recipe = script_fixture(_EXAMPLES / "flax_train_state.py", "flax_train_state")
nnx_recipe = script_fixture(_EXAMPLES / "nnx_optimizer.py", "nnx_optimizer")


@pytest.mark.parametrize("recipe", ["train_state_recipe", "nnx_recipe"])
def test_the_corrupted_batch_is_skipped_and_training_goes_on(recipe, request, capsys):
  module = request.getfixturevalue(recipe)
  logs = module.main(steps=40, spike_step=30)
  skipped = [i for i, log in enumerate(logs) if log["skip_spikes/skipped"]]
  assert skipped == [30]  # the loss passed as loss= is what made it a spike
  assert logs[30]["loss"] > 100 * max(log["loss"] for log in logs[20:30])
  losses = np.array([log["loss"] for i, log in enumerate(logs) if i != 30])
  assert np.all(np.isfinite(losses))
  assert losses[-5:].mean() < losses[:5].mean()  # it learns, before and after the spike
  assert len(capsys.readouterr().out.splitlines()) == 40


def test_apply_gradients_cannot_pass_the_loss_and_says_so(train_state_recipe):
  """Why the recipe has a custom step: TrainState.apply_gradients calls tx.update without loss=."""
  import jax
  import jax.numpy as jnp

  state = train_state_recipe.make_state(jax.random.PRNGKey(0))
  grads = jax.tree.map(jnp.ones_like, state.params)
  with pytest.raises(
    ValueError, match=r"skip_spikes watches the loss: call update\(\.\.\., loss=loss\)"
  ):
    state.apply_gradients(grads=grads)


guarded_recipe = script_fixture(_EXAMPLES / "guarded_step.py", "guarded_step_recipe")


def test_guarded_step_recipes_skip_the_bad_batches_in_linen_and_nnx(guarded_recipe, capsys):
  logs = guarded_recipe.main(steps=40, spike_step=30, nan_step=20)
  for name in ("linen", "nnx"):
    run = logs[name]
    assert [i for i, log in enumerate(run) if log["skip_spikes/skipped"]] == [20, 30], name
    assert [i for i, log in enumerate(run) if log["skip_nonfinite/skipped"]] == [20], name
    assert run[-1]["skip_spikes/total_skipped"] == 2
    losses = np.array([log["loss"] for i, log in enumerate(run) if i not in (20, 30)])
    assert np.all(np.isfinite(losses))
    assert losses[-5:].mean() < losses[:5].mean()
  assert len(capsys.readouterr().out.splitlines()) == 40


def test_guarded_train_state_matches_the_guard_as_a_transform(guarded_recipe):
  """The linen recipe's state after the bad batches equals the transform form's, run by hand."""
  import jax
  import jax.numpy as jnp
  import optax

  xs, ys = guarded_recipe.data(24, spike_step=22, nan_step=12)
  state = guarded_recipe.make_train_state(jax.random.PRNGKey(0))
  params, opt_state = state.params, state.opt_state

  @jax.jit
  def by_hand(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean((state.apply_fn(p, x) - y) ** 2))(params)
    updates, opt_state = state.tx.update(grads, opt_state, params, loss=loss)
    return optax.apply_updates(params, updates), opt_state

  for x, y in zip(xs, ys):
    state, _ = guarded_recipe.linen_step(state, x, y)
    params, opt_state = by_hand(params, opt_state, x, y)
  assert int(state.step) == 24
  assert int(state.opt_state.total_skipped) == int(opt_state.total_skipped) == 2
  for a, b in zip(
    jax.tree.leaves((state.params, state.opt_state)), jax.tree.leaves((params, opt_state))
  ):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)

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

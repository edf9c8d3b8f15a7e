"""examples/threshold_schedule.py: a scheduled threshold and an injected one, as written."""

import pathlib

import jax
import numpy as np
import optax
import pytest
from harness import script_fixture

import clipchain

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "threshold_schedule.py"
recipe = script_fixture(_SCRIPT, "threshold_schedule")


def test_the_threshold_follows_the_schedule(recipe):
  expected = [5.0 - 4.0 * min(i, 10) / 10 for i in range(12)]
  np.testing.assert_allclose(recipe.scheduled(10), expected, rtol=1e-6)


def test_an_injected_threshold_changes_mid_run(recipe):
  np.testing.assert_allclose(recipe.injected(), [4, 4, 4, 1, 1, 1], rtol=1e-6)


def test_only_agc_axes_need_static_args():
  g = {"w": np.ones((3, 4), np.float32)}
  tx = optax.inject_hyperparams(clipchain.adaptive_grad_clip)(clipping=0.01, axis=0)
  with pytest.raises(TypeError, match=r"static_args=\('axis',\)"):
    jax.jit(tx.update)(g, tx.init(g), g)  # under jit the injected axis is a traced value
  tx = optax.inject_hyperparams(clipchain.adaptive_grad_clip, static_args=("axis",))(
    clipping=0.01, axis=0
  )
  updates, _ = jax.jit(tx.update)(g, tx.init(g), g)
  assert updates["w"].shape == (3, 4)

"""examples/scanned_transformer.py: a linen decoder scanned over its blocks, boxed and sharded
FSDP over 8 devices. Its per-layer statistics are each scanned layer's own, as float64 NumPy
computes them from the gradients, and the NaN step is skipped."""

import pathlib

import numpy as np
import pytest
from harness import script_fixture

_EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
recipe = script_fixture(_EXAMPLES / "scanned_transformer.py", "scanned_transformer")


@pytest.fixture(scope="module")
def run(recipe):
  return recipe, *recipe.main(steps=12, nonfinite_step=9)


def _paths(tree, prefix=""):
  if isinstance(tree, dict):
    for key, value in tree.items():
      yield from _paths(value, f"{prefix}{key}/")
  else:
    yield prefix[:-1], tree


def test_every_scanned_layer_is_measured_and_logged_on_its_own(run):
  recipe, logs, grads = run
  for step in (0, 5, 11):
    log = logs[step]
    for path, g in _paths(grads[step]):
      if path.startswith("params/blocks/"):
        assert g.shape[0] == recipe.DEPTH, path
        for layer in range(recipe.DEPTH):
          want = np.sqrt(np.sum(g[layer] ** 2))
          np.testing.assert_allclose(log[f"monitor/norm/{path}/{layer}"], want, rtol=2e-6)
          assert f"zclip/norm/{path}/{layer}" in log
        assert f"monitor/norm/{path}" not in log  # no whole-stack entry
      else:
        np.testing.assert_allclose(log[f"monitor/norm/{path}"], np.sqrt(np.sum(g**2)), rtol=2e-6)
    total = np.sqrt(sum(np.sum(g**2) for _, g in _paths(grads[step])))
    np.testing.assert_allclose(log["monitor/norm"], total, rtol=2e-6)


def test_the_nonfinite_step_is_skipped_and_training_goes_on(run):
  _, logs, _ = run
  assert [i for i, log in enumerate(logs) if log["skip_nonfinite/skipped"]] == [9]
  assert np.isnan(logs[9]["loss"]) and all(np.isfinite(logs[i]["loss"]) for i in (10, 11))
  # The skipped step left every statistic as the step before had it.
  for key, value in logs[8].items():
    if key.startswith(("monitor/", "zclip/")):
      np.testing.assert_array_equal(logs[9][key], value, err_msg=key)

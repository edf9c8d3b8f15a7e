"""examples/muon_subset_clip.py: beside Muon the clip acts on AdamW's leaves alone and logs both
norms; checked against a float64 NumPy measurement of the same gradients."""

import pathlib

import jax
import numpy as np
from harness import script_fixture

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "muon_subset_clip.py"
recipe = script_fixture(_SCRIPT, "muon_subset_clip")


def test_the_recipe_logs_the_subsets_and_the_whole_trees_norm(recipe, capsys):
  log = recipe.main(steps=3, max_norm=0.05)
  assert len(capsys.readouterr().out.splitlines()) == 3
  # Step 0's gradient, measured here in float64: the biases' norm and the whole tree's.
  params = recipe.init_params(jax.random.key(0))
  x = jax.random.normal(jax.random.fold_in(jax.random.key(1), 0), (32, 8))
  grads = jax.grad(recipe.loss_fn)(params, x, np.sin(np.asarray(x).sum(axis=1, keepdims=True)))
  squares = {k: float(np.sum(np.asarray(g, np.float64) ** 2)) for k, g in _flat(grads).items()}
  subset = np.sqrt(sum(v for k, v in squares.items() if k.endswith("['bias']")))
  total = np.sqrt(sum(squares.values()))
  np.testing.assert_allclose(log[0]["clip_by_global_norm/norm"], subset, rtol=1e-5)
  np.testing.assert_allclose(log[0]["clip_by_global_norm/total_norm"], total, rtol=1e-5)
  assert subset > 0.05 and log[0]["clip_by_global_norm/clipped_fraction"] == 1.0
  assert all(np.isfinite(entry["loss"]) for entry in log)


def _flat(tree):
  return {
    jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }

"""examples/qk_clip_transformer.py: Muon with QK-Clip on a scanned Flax decoder keeps the largest
attention logit near tau where Muon alone lets it grow past 4 tau; the logged statistic is the
largest logit of the forward pass."""

import pathlib

import numpy as np
from harness import script_fixture

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "qk_clip_transformer.py"
recipe = script_fixture(_SCRIPT, "qk_clip_transformer")


def test_muon_with_qk_clip_keeps_the_logits_near_tau(recipe, capsys):
  tau = 30.0
  without = np.array([e["largest_logit"] for e in recipe.main(steps=40, tau=None)])
  log = recipe.main(steps=40, tau=tau)
  assert len(capsys.readouterr().out.splitlines()) == 2
  with_clip = np.array([e["largest_logit"] for e in log])
  assert without[-1] > 4 * tau
  # The logits of each forward pass: at most one step's growth above tau after a rescale.
  assert with_clip.max() <= 1.5 * tau and np.median(with_clip[-20:]) <= 1.25 * tau
  # What stats reports is the largest logit qk_clip was given, step for step.
  np.testing.assert_array_equal([e["qk_clip/max_logit"] for e in log], with_clip)
  assert max(e["qk_clip/clipped_fraction"] for e in log) > 0
  assert np.isfinite(log[-1]["loss"])

"""examples/orbax_resume.py: a run resumed from an Orbax checkpoint is bit-identical, and a
checkpoint restored into a transform with other settings fails instead of being misread."""

import pathlib

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from harness import bits, script_fixture

import clipchain

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "orbax_resume.py"
recipe = script_fixture(_SCRIPT, "orbax_resume")


def test_resumed_run_is_bit_identical(recipe, tmp_path):
  resumed, uninterrupted = recipe.main(str(tmp_path / "ckpt"), steps=20, stop_at=12)
  leaves_a, leaves_b = jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted)
  assert len(leaves_a) == len(leaves_b)
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(bits(a), bits(b))
  assert int(resumed["step"]) == 20
  # The checkpoint holds the adaptive clip's history: its statistics survived the round trip.
  assert float(clipchain.stats(resumed["opt_state"])["zclip/warmup_remaining"]) == 0.0


def test_restoring_into_other_settings_fails_loudly(recipe, tmp_path):
  state = recipe.init()
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(0, args=ocp.args.StandardSave(state["opt_state"]))
    manager.wait_until_finished()
  params = state["params"]
  other = clipchain.skip_nonfinite(
    optax.chain(clipchain.zclip(warmup_steps=5, granularity="layer"), optax.adamw(1e-2)),
    max_consecutive=3,
  )
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, other.init(params))
  # The settings records differ (global vs per-layer ZScore state): Orbax names them both.
  with (
    ocp.CheckpointManager(tmp_path / "ckpt") as manager,
    pytest.raises(ValueError, match=r"settings\.ZScore_groups_"),
  ):
    manager.restore(0, args=ocp.args.StandardRestore(target))

"""clipchain study: its metrics against hand-computed sequences, the runner, resume, the CLI."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipchain.study import Task, metrics, run, run_study
from clipchain.study import runner as runner_lib
from clipchain.study.cli import main

_ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Metrics, against sequences worked out by hand.


def test_final_loss_is_the_mean_of_the_last_tenth():
  assert metrics.final_loss(np.arange(1.0, 11.0)) == 10.0  # 10 steps: the last one
  assert metrics.final_loss(np.arange(1.0, 21.0)) == 19.5  # 20 steps: mean of 19 and 20
  assert metrics.final_loss(np.array([3.0])) == 3.0
  assert metrics.final_loss(np.array([1.0, np.nan])) is None


def test_best_loss_ignores_non_finite_values():
  assert metrics.best_loss(np.array([3.0, np.nan, 0.5, np.inf])) == 0.5
  assert metrics.best_loss(np.array([np.nan, np.nan])) is None


@pytest.mark.parametrize(
  "loss, expected",
  [
    ([1.0, 0.5, 0.25], False),  # learns
    ([1.0, 1.5, 1.9], False),  # final 1.9 <= 2 x 1.0
    ([1.0, 1.5, 2.5], True),  # final 2.5 > 2 x 1.0
    ([1.0, 0.5, np.nan, 0.5], True),  # non-finite anywhere, even if it recovers
    ([1.0, np.inf], True),
  ],
)
def test_diverged(loss, expected):
  assert metrics.diverged(np.array(loss)) is expected


def test_steps_to_target_uses_the_trailing_ten_step_mean():
  loss = np.array([5.0] * 10 + [0.5] * 10)
  # The window ending at step t holds t - 9 values of 0.5: its mean is <= 1 from 9 of them on,
  # (9 * 0.5 + 1 * 5) / 10 = 0.95, i.e. at t = 18.
  assert metrics.steps_to_target(loss, 1.0) == 18
  assert metrics.steps_to_target(loss, 0.1) is None
  assert metrics.steps_to_target(loss, None) is None
  assert metrics.steps_to_target(np.ones(5), 2.0) is None  # shorter than one window


def test_spike_count_counts_onsets_against_the_recent_spread():
  loss = np.ones(25)
  spiky = np.concatenate([loss, [3.0, 3.0, 1.0, 1.0, 5.0, 1.0]])
  assert metrics.spike_count(spiky) == 2  # 3, 3 is one spike (consecutive); 5 another
  # A flat run's floor is 0.1 x 1e-3 x |initial loss|: a rise of 5e-5 is not a spike, 2e-4 is.
  assert metrics.spike_count(np.concatenate([loss, [1.00005]])) == 0
  assert metrics.spike_count(np.concatenate([loss, [1.0002]])) == 1
  assert metrics.spike_count(np.concatenate([loss, [np.nan, np.nan]])) == 1
  # Within the first 20 steps nothing is judged.
  assert metrics.spike_count(np.array([1.0] * 5 + [100.0] + [1.0] * 5)) == 0


def _settled_run(seed=0, level=0.034, steps=600):
  """A loss falling from 0.17 to ``level`` with 15 % multiplicative batch noise: the shape of the
  default study's best SGD runs, which the old rule (2 x the trailing median) counted as ~100
  spikes."""
  rng = np.random.default_rng(seed)
  t = np.arange(steps)
  clean = level + (0.17 - level) * np.exp(-t / 80.0)
  return clean * (1.0 + 0.15 * rng.standard_normal(steps))


def test_noise_around_a_settled_loss_is_not_a_spike_and_a_real_one_is():
  for seed in range(5):
    loss = _settled_run(seed)
    assert metrics.spike_count(loss) == 0
    loss[400] = 0.12  # the loss jumps back most of the way to where it started
    assert metrics.spike_count(loss) == 1
    assert np.flatnonzero(metrics.spike_steps(loss)).tolist() == [400]


@pytest.mark.parametrize("shift", [0.0, -1.0, -100.0])
def test_spikes_and_divergence_hold_for_negative_and_zero_losses(shift):
  """``0.01 * mse - 1`` falling from -0.923 to -0.999 neither diverges nor spikes (the old rules:
  diverged, one spike); a real spike is found wherever the loss sits."""
  loss = 0.01 * _settled_run(1) * 45.0 + shift
  assert not metrics.diverged(loss)
  assert metrics.spike_count(loss) == 0
  spiked = loss.copy()
  spiked[300] = loss[0]
  assert metrics.spike_count(spiked) == 1
  rising = np.linspace(0.0, 1.0, 50) * 3.0 * max(abs(loss[0]), 1.0) + loss[0]
  assert metrics.diverged(rising)


@pytest.mark.parametrize(
  "loss, expected",
  [
    ([0.0, 0.0, 0.0], False),  # a zero loss that stays zero
    ([0.0, -1.0, -2.0], False),  # learns below zero
    ([-1.0, -0.5, -0.1], False),  # rises, but by less than |initial|
    ([-1.0, 0.0, 0.5], True),  # rises by more than |initial|
    ([0.0, 0.1], True),  # from zero, any rise
  ],
)
def test_divergence_of_losses_that_are_zero_or_negative(loss, expected):
  assert metrics.diverged(np.array(loss)) is expected


def test_over_clipped_needs_a_binding_clip_and_a_worse_loss_than_the_unclipped_run():
  # The unclipped run went from 1.0 to 0.2 (progress 0.8); 10 % of it is 0.08.
  assert metrics.over_clipped(0.95, 1.0, 0.3, 0.2, False)
  assert not metrics.over_clipped(0.95, 1.0, 0.25, 0.2, False)  # within 0.08
  assert not metrics.over_clipped(0.5, 1.0, 0.9, 0.2, False)  # binds on half the steps only
  assert not metrics.over_clipped(1.0, 1.0, 0.9, 0.2, True)  # the unclipped run diverged
  assert not metrics.over_clipped(1.0, 1.0, None, 0.2, False)


# ---------------------------------------------------------------------------------------------
# A task small enough to run every strategy in seconds: a linear model with a noisy target.


def _line_task(name: str = "line", **overrides) -> Task:
  def init(key):
    return {"w": 0.1 * jax.random.normal(key, (4,)), "b": jnp.zeros(())}

  def loss(params, batch):
    x, y = batch
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)

  def batches(key, step):
    x = jax.random.normal(jax.random.fold_in(key, step), (8, 4))
    return x, x @ jnp.array([1.0, -2.0, 0.5, 3.0]) + 1.0

  fields = dict(init=init, loss=loss, batches=batches, target_loss=0.1, steps=30)
  fields.update(overrides)
  return Task(name, **fields)


def test_sgd_explodes_at_a_high_lr_and_the_clip_bounds_it():
  records = run(
    _line_task(),
    strategies=["none", "global"],
    optimizers=["sgd"],
    lrs=[0.01, 1.0],
    seeds=2,
    steps=30,
  )
  main = [r for r in records if not r["sweep"]]
  none = {(r["lr"], r["seed"]): r for r in main if r["strategy"] == "none"}
  clipped = {(r["lr"], r["seed"]): r for r in main if r["strategy"] == "global"}
  for seed in range(2):
    # Gradient descent with momentum 0.9 on this quadratic is unstable at lr 1: the loss grows
    # geometrically. Clipped at the warm-up median norm, each step moves at most lr * c, so the
    # loss can only grow polynomially: still diverged by the rule, but by orders of magnitude less.
    assert none[(1.0, seed)]["diverged"] and none[(1.0, seed)]["final_loss"] > 1e9
    assert clipped[(1.0, seed)]["final_loss"] < 1e4
    assert not none[(0.01, seed)]["diverged"] and not clipped[(0.01, seed)]["diverged"]
  # The sweep runs the global clip at 0.25 and 4 times the median as well.
  multipliers = {r["threshold"]["multiplier"] for r in records if r["strategy"] == "global"}
  assert multipliers == {0.25, 1.0, 4.0}
  assert all(
    r["sweep"] == (r["threshold"]["multiplier"] != 1.0)
    for r in records
    if r["strategy"] == "global"
  )


def test_records_hold_every_field_and_agree_with_their_curves(tmp_path):
  records = run(
    _line_task(),
    strategies=["none", "zclip"],
    optimizers=["adam"],
    lrs=[0.01, 0.1],
    seeds=2,
    steps=30,
    out=tmp_path / "study",
  )
  out = tmp_path / "study"
  saved = json.loads((out / "results.json").read_text())
  assert saved["runs"] == records
  assert set(saved["meta"]) >= {"clipchain", "jax", "optax", "devices", "args", "metrics"}
  assert (out / "report.html").is_file() and (out / "report.md").is_file()
  assert len(records) == 2 * 2 * 2
  for record in records:
    with np.load(out / record["curves"]["file"]) as curves:
      i = record["curves"]["index"]
      assert curves["lr"][i] == np.float32(record["lr"]) and curves["seed"][i] == record["seed"]
      loss = curves["loss"][i]
      assert loss.shape == (30,)
      assert record["final_loss"] == pytest.approx(float(np.mean(loss[-3:].astype(np.float64))))
      assert record["initial_loss"] == pytest.approx(float(loss[0]))
      assert record["clipped_fraction"] == pytest.approx(float(np.mean(curves["clipped"][i])))
    assert record["step_cost"] is not None and record["step_cost"] > 0
    if record["strategy"] == "none":
      assert record["step_cost"] == 1.0 and record["clipped_fraction"] == 0.0


def test_runs_differ_by_seed_and_repeat_exactly():
  kwargs = dict(strategies=["none"], optimizers=["sgd"], lrs=[0.01], seeds=2, steps=10)
  first, second = run(_line_task(), **kwargs), run(_line_task(), **kwargs)
  assert [r["final_loss"] for r in first] == [r["final_loss"] for r in second]
  assert first[0]["final_loss"] != first[1]["final_loss"]


def test_after_placement_clips_the_optimizers_update():
  records = run(
    _line_task(),
    strategies=["global"],
    optimizers=["adam"],
    placements=["after"],
    lrs=[0.01],
    seeds=1,
    steps=10,
  )
  (record,) = records
  assert record["placement"] == "after" and not record["sweep"]
  # Adam's first update is about sign(g) per value: its norm is about sqrt(5) for 5 values.
  assert record["threshold"]["value"] == pytest.approx(math.sqrt(5), rel=0.05)


def test_python_api_refuses_bad_arguments():
  task = _line_task()
  with pytest.raises(ValueError, match="'momentum'"):
    run(task, optimizers=["momentum"])
  with pytest.raises(ValueError, match="'clipall'"):
    run(task, strategies=["clipall"])
  with pytest.raises(ValueError, match=r"lrs.*-0\.1"):
    run(task, lrs=[-0.1])
  with pytest.raises(ValueError, match=r"seeds.*0"):
    run(task, seeds=0)
  with pytest.raises(TypeError, match="steps"):
    run(task, steps=2.5)
  with pytest.raises(TypeError, match="Task"):
    run_study(["line"])
  with pytest.raises(TypeError, match="init"):
    Task("bad", init=None, loss=lambda p, b: 0.0, batches=lambda k, s: 0)


# ---------------------------------------------------------------------------------------------
# Interrupted and resumed: the same results as one uninterrupted study.


def _comparable(records):
  timing = {"steps_per_second", "step_cost"}
  return [{k: v for k, v in r.items() if k not in timing} for r in records]


def test_resume_after_an_interrupt_equals_an_uninterrupted_study(tmp_path, monkeypatch):
  kwargs = dict(
    strategies=["none", "global", "zclip"],
    optimizers=["sgd"],
    lrs=[0.01, 0.5],
    seeds=2,
    steps=20,
    sweep=(),
  )
  whole, _ = run_study([_line_task()], out=tmp_path / "whole", **kwargs)

  executed = []
  real = runner_lib.execute_cell

  def interrupted_after_two(cell, *args):
    if len(executed) == 2:
      raise KeyboardInterrupt
    executed.append(cell.name)
    return real(cell, *args)

  out = tmp_path / "study"
  monkeypatch.setattr(runner_lib, "execute_cell", interrupted_after_two)
  with pytest.raises(KeyboardInterrupt):
    run_study([_line_task()], out=out, **kwargs)
  # No report written; the two finished cells kept.
  assert sorted(p.name for p in out.iterdir()) == [".clipchain-partial"]
  kept = sorted(p.name for p in (out / ".clipchain-partial").glob("*.json"))
  assert kept == sorted(f"{name}.json" for name in executed)

  executed.clear()
  monkeypatch.setattr(
    runner_lib,
    "execute_cell",
    lambda cell, *args: (executed.append(cell.name), real(cell, *args))[1],
  )
  resumed, _ = run_study([_line_task()], out=out, resume=True, **kwargs)
  assert len(executed) == 1  # only the cell that had not finished
  assert _comparable(resumed) == _comparable(whole)
  assert sorted(p.name for p in out.iterdir()) == [
    "curves", "plots", "report.html", "report.md", "results.json",
  ]  # fmt: skip
  saved = json.loads((out / "results.json").read_text())["runs"]
  assert _comparable(saved) == _comparable(whole)


# ---------------------------------------------------------------------------------------------
# The command line.


def _run_cli(args, cwd, env_extra=None, timeout=120):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
  env.update({"JAX_PLATFORMS": "cpu", **(env_extra or {})})
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")]))
  return subprocess.run(
    [sys.executable, "-m", "clipchain", *args],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


@pytest.mark.parametrize(
  "args, named",
  [
    (["--task", "mnist"], ["--task", "'mnist'"]),
    (["--strategies", "clipall"], ["--strategies", "'clipall'"]),
    (["--optimizers", "lion"], ["--optimizers", "'lion'"]),
    (["--lrs", "0"], ["--lrs", "'0'"]),
    (["--lrs", "0.1", "-0.001"], ["--lrs", "'-0.001'"]),
    (["--lrs", "nan"], ["--lrs", "'nan'"]),
    (["--seeds", "0"], ["--seeds", "'0'"]),
    (["--steps", "0"], ["--steps", "'0'"]),
    (["--steps", "ten"], ["--steps", "'ten'"]),
    (["--placement", "middle"], ["--placement", "'middle'"]),
    (["--quick", "--full"], ["--full", "--quick"]),
  ],
)
def test_bad_arguments_exit_2_naming_the_argument_and_write_nothing(
  args, named, tmp_path, monkeypatch, capsys
):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(SystemExit) as exit_info:
    main(["study", *args, "--out", str(tmp_path / "out")])
  assert exit_info.value.code == 2
  message = capsys.readouterr().err
  for word in named:
    assert word in message, message
  assert list(tmp_path.iterdir()) == []


def test_an_output_path_that_is_a_file_exits_2(tmp_path, capsys):
  target = tmp_path / "results"
  target.write_text("not a directory")
  with pytest.raises(SystemExit) as exit_info:
    main(["study", "--quick", "--out", str(target)])
  assert exit_info.value.code == 2
  message = capsys.readouterr().err
  assert "--out" in message and str(target) in message
  assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
  with pytest.raises(SystemExit) as exit_info:
    main(["study", "--quick", "--out", str(target / "sub")])  # inside a file: cannot be created
  assert exit_info.value.code == 2
  assert "--out" in capsys.readouterr().err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_help_documents_every_option_with_its_default(capsys):
  with pytest.raises(SystemExit) as exit_info:
    main(["study", "--help"])
  assert exit_info.value.code == 0
  text = " ".join(capsys.readouterr().out.split())
  for option in (
    "--task",
    "--strategies",
    "--optimizers",
    "--placement",
    "--lrs",
    "--seeds",
    "--steps",
    "--out",
    "--quick",
    "--full",
    "--resume",
  ):
    assert option in text
  assert "(default: both)" in text and "(default: clipchain-study)" in text
  assert "(default: 3)" in text  # seeds


# ---------------------------------------------------------------------------------------------
# Output directories and odd inputs.


def test_a_users_files_in_the_output_directory_are_left_alone(tmp_path):
  out = tmp_path / "mine"
  (out / "notes").mkdir(parents=True)
  (out / "precious.txt").write_text("keep me")
  (out / "notes" / "draft.md").write_text("and me")
  kwargs = dict(strategies=["none"], optimizers=["sgd"], lrs=[0.01], seeds=1, steps=5)
  run(_line_task(), out=out, **kwargs)
  run(_line_task(), out=out, **kwargs)  # a second study replaces only its own files
  assert (out / "precious.txt").read_text() == "keep me"
  assert (out / "notes" / "draft.md").read_text() == "and me"
  assert (out / "results.json").is_file()
  assert not [p for p in out.iterdir() if p.name.startswith(".clipchain")]


def test_the_current_directory_and_a_symlink_are_valid_outputs(tmp_path, monkeypatch):
  kwargs = dict(strategies=["none"], optimizers=["sgd"], lrs=[0.01], seeds=1, steps=5)
  monkeypatch.chdir(tmp_path)
  run(_line_task(), out=".", **kwargs)
  assert (tmp_path / "report.html").is_file()
  (tmp_path / "real").mkdir()
  (tmp_path / "link").symlink_to(tmp_path / "real")
  for _ in range(2):
    run(_line_task(), out=tmp_path / "link", **kwargs)
  assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "results.json").is_file()


def test_task_names_never_leave_the_output_directory(tmp_path):
  out = tmp_path / "a" / "study"
  kwargs = dict(strategies=["none"], optimizers=["sgd"], lrs=[0.01], seeds=1, steps=5, out=out)
  records = run(_line_task(name="../../escape/me"), **kwargs)
  assert records[0]["task"] == "../../escape/me"
  assert records[0]["curves"]["file"] == "curves/_._.._escape_me__sgd__none__before.npz"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
  assert (out / records[0]["curves"]["file"]).is_file()


def test_tasks_sharing_a_file_name_are_refused():
  with pytest.raises(ValueError, match=r"'a/b' and 'a_b' would share file names"):
    run_study([_line_task(name="a/b"), _line_task(name="a_b")], strategies=["none"])


def test_params_must_be_a_non_empty_float_tree():
  with pytest.raises(TypeError, match=r"every parameter must be a float array.*int32"):
    run(_line_task(init=lambda key: {"w": jnp.zeros(4, jnp.int32)}), strategies=["none"])
  with pytest.raises(ValueError, match=r"init returned no parameters"):
    run(_line_task(init=lambda key: {}), strategies=["none"])


def test_lrs_are_checked_against_the_optimizers():
  with pytest.raises(ValueError, match=r"optimizers that do not exist: \['sgdd'\]"):
    run(_line_task(), optimizers=["sgd"], lrs={"sgdd": [0.5]})
  with pytest.raises(TypeError, match=r"lrs must be a sequence.*0.1"):
    run(_line_task(), lrs=0.1)
  # An optimizer the mapping does not name uses the task's own grid; duplicates run once.
  records = run(
    _line_task(lrs={"adam": (0.02,)}),
    strategies=["none"],
    optimizers=["sgd", "adam"],
    lrs={"sgd": [0.01, 0.01]},
    seeds=1,
    steps=5,
  )
  assert sorted((r["optimizer"], r["lr"]) for r in records) == [("adam", 0.02), ("sgd", 0.01)]


def test_a_task_that_is_nan_at_init_is_a_result_when_nothing_needs_a_warm_up():
  """``none`` and the adaptive strategies run without the warm-up; every run is diverged."""
  task = _line_task(loss=lambda params, batch: jnp.nan * jnp.sum(params["w"]))
  records = run(task, strategies=["none", "zclip"], optimizers=["sgd"], lrs=[0.1], seeds=1, steps=5)
  assert [r["diverged"] for r in records] == [True, True]
  assert all(r["final_loss"] is None for r in records)
  with pytest.raises(ValueError, match=r"warm-up gradients are not finite"):
    run(task, strategies=["global"], optimizers=["sgd"], lrs=[0.1], seeds=1, steps=5)


def test_quick_and_full_change_defaults_but_given_options_win():
  from clipchain.study.cli import _options, _parser

  def options(*argv):
    return _options(_parser().parse_args(["study", *argv]))

  quick = options("--quick")
  assert quick["tasks"] == ("rnn-adding",) and quick["seeds"] == 1 and quick["steps"] == 60
  given = options("--quick", "--task", "lm", "--seeds", "3", "--optimizers", "adam", "adam",
                  "--placement", "after")  # fmt: skip
  assert given["tasks"] == ("lm",) and given["seeds"] == 3 and given["steps"] == 60
  assert given["optimizers"] == ("adam",) and given["placements"] == ("after",)
  full = options("--full", "--strategies", "none", "global")
  assert full["tasks"] == ("rnn-adding", "lm", "heavy-tail", "outlier-batches")
  assert full["strategies"] == ("none", "global") and "muon" in full["optimizers"]
  default = options()
  assert default["placements"] == ("before", "after") and default["seeds"] == 3
  # Each default task with the optimizer whose instability it shows; --task alone keeps that.
  assert default["optimizers"] == {"rnn-adding": ("sgd",), "outlier-batches": ("adam",)}
  assert options("--task", "lm", "rnn-adding")["optimizers"] == {
    "lm": ("sgd", "adam"),
    "rnn-adding": ("sgd",),
  }


def test_stable_adamw_wraps_adam_family_optimizers_after_only():
  records = run(
    _line_task(),
    strategies=["stable-adamw", "normalize"],
    optimizers=["sgd", "adam"],
    placements=["before", "after"],
    lrs=[0.01],
    seeds=1,
    steps=10,
  )
  ran = {(r["strategy"], r["optimizer"], r["placement"]) for r in records}
  # SGD keeps no second moment, and StableAdamW clips the update: nothing else runs.
  assert {k for k in ran if k[0] == "stable-adamw"} == {("stable-adamw", "adam", "after")}
  assert {("normalize", "sgd", "before"), ("normalize", "adam", "after")} <= ran
  normalized = [r for r in records if r["strategy"] == "normalize"]
  assert all(r["threshold"]["value"] is not None for r in normalized)


@pytest.mark.parametrize("name", ["value", "global", "layer", "normalize", "global+skip"])
def test_a_fixed_strategys_recorded_threshold_is_the_one_its_clip_applies(name):
  import clipchain as cc
  from clipchain.study.strategies import STRATEGIES, Calibration

  strategy = STRATEGIES[name]
  calibration = Calibration(global_norm=3.0, layer_norm=2.0, abs_p99=0.5, subset_norm=1.0)
  tx = strategy.build(calibration, 0.25)
  g = {"w": jnp.ones(3)}
  _, state = tx.update(g, tx.init(g))
  applied = {float(v) for k, v in cc.stats(state).items() if "/threshold" in k}
  assert applied == {strategy.threshold(calibration, 0.25)}


# ---------------------------------------------------------------------------------------------
# Muon: its direction, and the clip of the leaves it does not orthogonalise.


def _matrix_task() -> Task:
  """A two-layer regression: two matrices (Muon's) and two biases (its AdamW's)."""

  def init(key):
    k1, k2 = jax.random.split(key)
    return {
      "hidden": {"kernel": 0.5 * jax.random.normal(k1, (4, 6)), "bias": jnp.zeros(6)},
      "out": {"kernel": 0.5 * jax.random.normal(k2, (6, 1)), "bias": jnp.zeros(1)},
    }

  def loss(params, batch):
    x, y = batch
    h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    return jnp.mean((h @ params["out"]["kernel"] + params["out"]["bias"] - y[:, None]) ** 2)

  def batches(key, step):
    x = jax.random.normal(jax.random.fold_in(key, step), (8, 4))
    return x, jnp.sin(x @ jnp.array([1.0, -2.0, 0.5, 3.0])) + 1.0

  return Task("matrices", init=init, loss=loss, batches=batches, target_loss=0.1, steps=20)


def _steps(tx, params, grads_list):
  state, out = tx.init(params), []
  for g in grads_list:
    u, state = tx.update(g, state, params)
    params = jax.tree.map(lambda p, d: p + d, params, u)
    out.append(params)
  return out


def test_the_muon_direction_scaled_by_minus_lr_is_optax_muon():
  import optax

  from clipchain.study.strategies import OPTIMIZERS

  task = _matrix_task()
  params = task.init(jax.random.PRNGKey(0))
  grads = [jax.grad(task.loss)(params, task.batches(jax.random.PRNGKey(1), t)) for t in range(3)]
  ours = _steps(optax.chain(OPTIMIZERS["muon"](), optax.scale(-0.02)), params, grads)
  reference = _steps(optax.contrib.muon(0.02), params, grads)
  for a, b in zip(ours, reference, strict=True):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)


def test_the_subset_strategy_clips_only_muons_adamw_leaves_at_their_warm_up_norm():
  import optax

  import clipchain as cc
  from clipchain.study.strategies import STRATEGIES, Calibration

  task = _matrix_task()
  params = task.init(jax.random.PRNGKey(0))
  grads = [
    jax.tree.map(
      lambda x: 10.0 * x, jax.grad(task.loss)(params, task.batches(jax.random.PRNGKey(1), t))
    )
    for t in range(3)
  ]
  calibration = Calibration(global_norm=3.0, layer_norm=2.0, abs_p99=0.5, subset_norm=0.05)
  ours = optax.chain(
    STRATEGIES["global-subset"].transform("muon", "before", calibration, 1.0),
    optax.scale(-0.02),
  )
  # Levanter's arrangement, written by hand: the clip inside the AdamW branch of Muon's partition.
  labels = lambda tree: jax.tree.map(lambda x: "muon" if x.ndim == 2 else "adam", tree)
  hand = optax.partition(
    {
      "muon": optax.contrib.muon(0.02),
      "adam": optax.chain(
        cc.clip_by_global_norm(0.05), optax.adamw(0.02, eps=1e-8, weight_decay=0.0, nesterov=True)
      ),
    },
    labels,
  )
  for a, b in zip(_steps(ours, params, grads), _steps(hand, params, grads), strict=True):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)


def test_a_study_of_muon_runs_the_subset_clip_with_muon_only_and_calibrates_it():
  from clipchain.study.runner import WARMUP_BATCHES, calibrate

  task = _matrix_task()
  records = run(
    task,
    strategies=["none", "global", "global-subset"],
    optimizers=["muon", "adam"],
    placements=["before"],
    lrs=[0.01],
    seeds=1,
    steps=10,
  )
  main = [r for r in records if not r["sweep"]]
  ran = {(r["strategy"], r["optimizer"]) for r in main}
  assert ("global-subset", "muon") in ran and ("global-subset", "adam") not in ran
  assert ("global", "muon") in ran and all(np.isfinite(r["final_loss"]) for r in main)
  # The subset's warm-up norm: the median over the warm-up of the biases' global norm, in float64.
  params = task.init(jax.random.split(jax.random.PRNGKey(0), 3)[0])
  data_key = jax.random.split(jax.random.PRNGKey(0), 3)[1]
  norms = []
  for t in range(WARMUP_BATCHES):
    g = jax.grad(task.loss)(params, task.batches(data_key, t))
    biases = [np.asarray(g[k]["bias"], np.float64) for k in ("hidden", "out")]
    norms.append(math.sqrt(sum(float(np.sum(b**2)) for b in biases)))
  assert calibrate(task, "muon", "before").subset_norm == pytest.approx(np.median(norms), rel=1e-5)
  (subset,) = [r for r in main if r["strategy"] == "global-subset"]
  assert subset["threshold"]["value"] == pytest.approx(np.median(norms), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# What an adversarial user tried: each failure of the study's files, inputs and resumption.

_TINY = dict(strategies=["none"], optimizers=["sgd"], lrs=[0.01], seeds=1, steps=5)


def test_a_users_files_inside_plots_and_curves_are_left_alone(tmp_path):
  out = tmp_path / "d"
  (out / "plots").mkdir(parents=True)
  (out / "curves").mkdir()
  (out / "plots" / "mine.png").write_text("x")
  (out / "curves" / "mine.npz").write_text("y")
  run(_line_task(), out=out, **_TINY)
  run(_line_task(), out=out, **_TINY)  # replaces only what the first study wrote
  assert (out / "plots" / "mine.png").read_text() == "x"
  assert (out / "curves" / "mine.npz").read_text() == "y"
  files = json.loads((out / "results.json").read_text())["meta"]["files"]
  assert "plots/mine.png" not in files and "results.json" in files
  # A study that writes fewer files removes the previous study's stale ones, and only those.
  run(_line_task(), out=out, **{**_TINY, "strategies": ["none", "global"]})
  assert (out / "curves" / "line__sgd__global__before.npz").is_file()
  run(_line_task(), out=out, **_TINY)
  assert not (out / "curves" / "line__sgd__global__before.npz").exists()
  assert (out / "curves" / "mine.npz").read_text() == "y"


def test_a_users_file_where_the_study_would_write_is_refused_and_kept(tmp_path):
  out = tmp_path / "d"
  (out / "plots").mkdir(parents=True)
  (out / "plots" / "line-stability.png").write_text("mine")
  with pytest.raises(ValueError, match=r"holds plots/line-stability.png, not written by a study"):
    run(_line_task(), out=out, **_TINY)
  assert (out / "plots" / "line-stability.png").read_text() == "mine"
  assert not (out / "results.json").exists()
  (out / "report.md").write_text("my report")
  with pytest.raises(ValueError, match=r"holds report.md, not written by a study"):
    run(_line_task(), out=tmp_path / "d", **_TINY)  # refused before training
  assert (out / "report.md").read_text() == "my report"


def test_an_empty_out_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(SystemExit) as exit_info:
    main(["study", "--quick", "--out", ""])
  assert exit_info.value.code == 2
  assert "--out" in capsys.readouterr().err
  assert list(tmp_path.iterdir()) == []
  with pytest.raises(ValueError, match=r"out must name a directory, got ''"):
    run(_line_task(), out="", **_TINY)


def test_a_grid_with_no_runnable_cell_exits_2_naming_why(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(SystemExit) as exit_info:
    main(["study", "--strategies", "stable-adamw", "--optimizers", "sgd", "--out", "o"])
  assert exit_info.value.code == 2
  err = " ".join(capsys.readouterr().err.split())
  assert "nothing to run" in err and "stable-adamw runs with adam, adamw after only" in err
  assert list(tmp_path.iterdir()) == []


def test_a_second_study_into_an_out_in_use_is_refused(tmp_path):
  out = tmp_path / "d"
  out.mkdir()
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    import socket

    lock = {"pid": holder.pid, "host": socket.gethostname()}
    (out / ".clipchain-lock").write_text(json.dumps(lock))
    with pytest.raises(ValueError, match=rf"in use by another study \(process {holder.pid}"):
      run(_line_task(), out=out, **_TINY)
    assert sorted(p.name for p in out.iterdir()) == [".clipchain-lock"]
  finally:
    holder.kill()
    holder.wait()
  # The process holding it has ended: the lock is stale, taken over and removed afterwards.
  run(_line_task(), out=out, **_TINY)
  assert (out / "results.json").is_file() and not (out / ".clipchain-lock").exists()


def test_resume_recomputes_cells_of_a_task_that_changed_under_its_name(tmp_path, monkeypatch):
  kwargs = dict(strategies=["none", "global"], optimizers=["sgd"], lrs=[0.01], seeds=1, steps=10)
  out = tmp_path / "study"
  executed = []
  real = runner_lib.execute_cell

  def interrupted_after_one(cell, *args):
    if executed:
      raise KeyboardInterrupt
    executed.append(cell.name)
    return real(cell, *args)

  monkeypatch.setattr(runner_lib, "execute_cell", interrupted_after_one)
  with pytest.raises(KeyboardInterrupt):
    run_study([_line_task()], out=out, **kwargs)
  monkeypatch.setattr(runner_lib, "execute_cell", real)
  # The same name, a loss 100 times larger: the finished cell is stale.
  changed = _line_task(loss=lambda p, b: 100.0 * jnp.mean((b[0] @ p["w"] + p["b"] - b[1]) ** 2))
  records, meta = run_study([changed], out=out, resume=True, **kwargs)
  initial = {r["strategy"]: r["initial_loss"] for r in records}
  assert initial["none"] == pytest.approx(initial["global"])
  fresh, _ = run_study([changed], **kwargs)
  assert _comparable(records) == _comparable(fresh)
  assert meta["tasks"]["line"]["fingerprint"] == runner_lib.fingerprint(changed)
  assert runner_lib.fingerprint(changed) != runner_lib.fingerprint(_line_task())


def test_batches_that_are_not_a_pure_function_of_key_and_step_are_refused():
  data = iter([(jnp.ones((8, 4)), jnp.ones(8))] * 3)
  with pytest.raises(TypeError, match=r"pure JAX function of \(key, step\)"):
    run(_line_task(batches=lambda key, step: next(data)), **_TINY)
  counter = iter(range(10**6))
  with pytest.raises(TypeError, match=r"two calls with the same key and step 0 gave different"):
    run(_line_task(batches=lambda key, step: (jnp.ones((8, 4)) * next(counter), jnp.ones(8))),
        **_TINY)  # fmt: skip
  exhausted = iter([])
  with pytest.raises(TypeError, match=r"raised StopIteration \(a Python iterator"):
    run(_line_task(batches=lambda key, step: next(exhausted)), **_TINY)
  xs = jax.random.normal(jax.random.PRNGKey(1), (5, 8, 4))
  past_end = lambda key, step: (xs[step], xs[step] @ jnp.ones(4))
  with pytest.raises(ValueError, match=r"same at steps 28 and 29.*index an array past its end"):
    run(_line_task(batches=past_end), **{**_TINY, "steps": 30})
  # One fixed batch for every step (full-batch training) is a pure function: accepted.
  fixed = lambda key, step: (xs[0], xs[0] @ jnp.ones(4))
  assert run(_line_task(batches=fixed), **_TINY)[0]["final_loss"] is not None


def test_strategies_may_be_strategy_objects_of_ones_own():
  import optax

  from clipchain.study.strategies import Strategy

  halve = Strategy("halve", lambda c, m: optax.scale(0.5), "halve every gradient", fixed=False)
  records = run(_line_task(), strategies=["none", halve], optimizers=["sgd"], lrs=[0.01], seeds=1,
                steps=10)  # fmt: skip
  assert {r["strategy"] for r in records} == {"none", "halve"}
  with pytest.raises(TypeError, match=r"strategies must hold names or Strategy objects, got 3"):
    run(
      _line_task(), strategies=["none", 3], **{k: v for k, v in _TINY.items() if k != "strategies"}
    )


def test_results_json_holds_the_analysis_with_intervals_over_seeds(tmp_path):
  out = tmp_path / "study"
  records = run(
    _line_task(),
    strategies=["none", "global"],
    optimizers=["sgd"],
    lrs=[0.01, 1.0],
    seeds=3,
    steps=30,
    out=out,
  )
  saved = json.loads((out / "results.json").read_text())
  line = saved["analysis"]["tasks"]["line"]
  sgd = line["optimizers"]["sgd"]
  rows = {(r["strategy"], r["placement"]): r for r in sgd["rows"]}
  # The baseline's best final loss is the mean over seeds at its best stable lr, by hand.
  none = [r for r in records if r["strategy"] == "none" and not r["diverged"]]
  by_lr = {}
  for r in none:
    by_lr.setdefault(r["lr"], []).append(r["final_loss"])
  assert rows[("none", "before")]["best_final"] == pytest.approx(min(map(np.mean, by_lr.values())))
  change = rows[("global", "before")]["loss_change"]
  assert set(change) == {"estimate", "low", "high", "resolved"}
  assert change["low"] <= change["estimate"] <= change["high"]
  assert saved["analysis"]["confidence"] == 0.95 and sgd["verdict"] in {
    "helps",
    "indistinguishable",
    "worse",
  }
  assert line["unstable_without_clipping"] is True  # plain SGD diverges at lr 1 in every seed


def test_a_study_written_before_files_were_listed_is_replaced_whole(tmp_path):
  out = tmp_path / "d"
  run(_line_task(), out=out, **_TINY)
  saved = json.loads((out / "results.json").read_text())
  del saved["meta"]["files"]  # as studies wrote it before
  (out / "results.json").write_text(json.dumps(saved))
  (out / "plots" / "mine.png").write_text("x")
  run(_line_task(), out=out, **_TINY)
  assert (out / "plots" / "mine.png").read_text() == "x"
  assert (
    "plots/line-stability.png" in json.loads((out / "results.json").read_text())["meta"]["files"]
  )

"""examples/data_parallel.py and ``clipchain study`` across two processes equal one process.

Two processes on 127.0.0.1 join with ``jax.distributed.initialize`` (2 CPU devices each, a global
4-device mesh, gloo collectives) and train with a clip and ``skip_nonfinite``; one process with 4
CPU devices runs the same training as the reference. One step carries a NaN target in the rows of
process 1 only: process 0 must skip it too, from the all-reduced gradient, in the compiled step.
Every process is bounded by a timeout and killed if the run fails.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from harness import child_jax_settings

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_SCRIPT = _ROOT / "examples" / "data_parallel.py"
TIMEOUT_S = 120
STEPS = 12
OUTLIER_STEP = 7  # the example multiplies the targets of steps 7, 17, ... by 30
NAN_STEP = 9
TRAINING_ARGS = ["--steps", str(STEPS), "--nan-step", str(NAN_STEP)]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(tmp: pathlib.Path, name: str, args: list[str], env: dict[str, str]):
  """Starts the example in a fresh interpreter whose JAX settings come only from ``env``."""
  # Proxy variables can hang jax.distributed.initialize (JAX warns about them).
  inherited = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("XLA_", "JAX_", "CLIPCHAIN_")) and "_proxy" not in k.lower()
  }
  python_path = os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")]))
  # A file, not a pipe: no process blocks on a full pipe while another is being waited for.
  with open(tmp / f"{name}.log", "w") as log:
    return subprocess.Popen(
      [sys.executable, str(_SCRIPT), *args, "--out", str(tmp / f"{name}.npz")],
      env={
        **inherited,
        **child_jax_settings(),
        "PYTHONPATH": python_path,
        "JAX_PLATFORMS": "cpu",
        **env,
      },
      stdout=log,
      stderr=subprocess.STDOUT,
    )


def failures(procs: dict[str, subprocess.Popen]) -> list[str]:
  return [f"{name} exited with status {p.returncode}" for name, p in procs.items() if p.poll()]


def wait_all(procs: dict[str, subprocess.Popen], tmp: pathlib.Path) -> dict[str, str]:
  """Waits for every process within one deadline; kills them all as soon as one fails (its peer
  would otherwise wait in a collective until the deadline) or when time runs out."""
  deadline = time.monotonic() + TIMEOUT_S
  try:
    while not (failed := failures(procs)) and any(p.poll() is None for p in procs.values()):
      if time.monotonic() > deadline:
        failed = [f"the processes did not finish within {TIMEOUT_S} s"]
        break
      time.sleep(0.1)
  finally:
    for proc in procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  logs = {name: (tmp / f"{name}.log").read_text() for name in procs}
  if failed:
    pytest.fail("; ".join(failed) + "".join(f"\n--- {n}:\n{log}" for n, log in logs.items()))
  return logs


@pytest.fixture(scope="module", params=["global", "zclip"])
def runs(request, tmp_path_factory):
  """The outputs and logs of process 0, process 1 and the single-process reference."""
  tmp = tmp_path_factory.mktemp(f"multiprocess_{request.param}")
  args = [*TRAINING_ARGS, "--clip", request.param]
  cluster = {
    "CLIPCHAIN_COORDINATOR": f"127.0.0.1:{free_port()}",
    "CLIPCHAIN_NUM_PROCESSES": "2",
    "JAX_NUM_CPU_DEVICES": "2",
  }
  procs = {
    "process_0": launch(tmp, "process_0", args, {**cluster, "CLIPCHAIN_PROCESS_ID": "0"}),
    "process_1": launch(tmp, "process_1", args, {**cluster, "CLIPCHAIN_PROCESS_ID": "1"}),
    "reference": launch(tmp, "reference", args, {"JAX_NUM_CPU_DEVICES": "4"}),
  }
  logs = wait_all(procs, tmp)
  outputs = {}
  for name in procs:
    with np.load(tmp / f"{name}.npz") as data:
      outputs[name] = {key: data[key] for key in data.files}
  return request.param, outputs, logs


def test_both_processes_hold_the_same_parameters_and_statistics(runs):
  _, outputs, _ = runs
  p0, p1 = outputs["process_0"], outputs["process_1"]
  assert sorted(p0) == sorted(p1)
  assert any(key.startswith("params/") for key in p0)
  for key in p0:
    np.testing.assert_array_equal(p0[key], p1[key], err_msg=key)


def test_two_processes_equal_one_process(runs):
  _, outputs, _ = runs
  multi, single = outputs["process_0"], outputs["reference"]
  assert sorted(multi) == sorted(single)
  for key in multi:
    # Only the order of the all-reduce's additions differs (gloo across processes).
    np.testing.assert_allclose(multi[key], single[key], rtol=1e-5, atol=1e-7, err_msg=key)


def test_nan_step_is_skipped_by_every_process(runs):
  _, outputs, _ = runs
  for name, out in outputs.items():
    skipped = out["stats/skip_nonfinite/skipped"]
    np.testing.assert_array_equal(np.flatnonzero(skipped), [NAN_STEP], err_msg=name)
    assert out["stats/skip_nonfinite/total_skipped"][-1] == 1, name
    assert np.isnan(out["stats/loss"][NAN_STEP]), name
    assert np.isnan(out["stats/grad_norm"][NAN_STEP]), name
    assert np.isfinite(out["stats/loss"][NAN_STEP + 1 :]).all(), name
    for key, value in out.items():
      if key.startswith("params/"):
        assert np.isfinite(value).all(), (name, key)


def test_outlier_batch_is_clipped(runs):
  clip, outputs, _ = runs
  for name, out in outputs.items():
    assert out["stats/clip/clipped_fraction"][OUTLIER_STEP] == 1.0, name
    assert out["stats/grad_norm"][OUTLIER_STEP] > 5 * out["stats/clip/threshold"][OUTLIER_STEP]
    if clip == "zclip":
      np.testing.assert_array_equal(np.flatnonzero(out["stats/clip/spike"]), [OUTLIER_STEP])


def test_only_process_0_prints(runs):
  _, _, logs = runs
  assert "2 process(es), 4 device(s)" in logs["process_0"]
  assert "step" not in logs["process_1"]
  assert "1 process(es), 4 device(s)" in logs["reference"]


def test_study_across_two_processes_equals_one_process(tmp_path):
  """``clipchain study`` with the runs of each cell sharded over two processes' devices: process 0
  writes the same results as one process with as many devices; process 1 writes nothing."""
  args = ["--quick", "--steps", "20", "--seeds", "2", "--strategies", "none", "global"]
  args += ["--optimizers", "sgd"]
  cluster = {
    "CLIPCHAIN_COORDINATOR": f"127.0.0.1:{free_port()}",
    "CLIPCHAIN_NUM_PROCESSES": "2",
    "JAX_NUM_CPU_DEVICES": "1",
  }
  python_path = os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")]))
  inherited = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("XLA_", "JAX_", "CLIPCHAIN_")) and "_proxy" not in k.lower()
  }

  def study(name, out, env):
    with open(tmp_path / f"{name}.log", "w") as log:
      return subprocess.Popen(
        [sys.executable, "-m", "clipchain", "study", *args, "--out", str(tmp_path / out)],
        env={
          **inherited,
          **child_jax_settings(),
          "PYTHONPATH": python_path,
          "JAX_PLATFORMS": "cpu",
          **env,
        },
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
      )

  procs = {
    "process_0": study("process_0", "multi", {**cluster, "CLIPCHAIN_PROCESS_ID": "0"}),
    "process_1": study("process_1", "multi", {**cluster, "CLIPCHAIN_PROCESS_ID": "1"}),
    "reference": study("reference", "single", {"JAX_NUM_CPU_DEVICES": "2"}),
  }
  logs = wait_all(procs, tmp_path)
  assert "Report:" in logs["process_0"] and "Report:" not in logs["process_1"]
  timing = {"steps_per_second", "step_cost"}
  multi, single = (
    json.loads((tmp_path / out / "results.json").read_text()) for out in ("multi", "single")
  )
  assert multi["meta"]["process_count"] == 2 and len(multi["meta"]["devices"]) == 2
  assert [{k: v for k, v in r.items() if k not in timing} for r in multi["runs"]] == [
    {k: v for k, v in r.items() if k not in timing} for r in single["runs"]
  ]
  for path in sorted((tmp_path / "multi" / "curves").glob("*.npz")):
    with np.load(path) as a, np.load(tmp_path / "single" / "curves" / path.name) as b:
      for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{path.name}:{key}")

"""``clipchain study --quick`` end to end, as a user runs it: files, schema, browser, devices.

The quick study runs once per device count in a fresh interpreter (8 simulated CPU devices, as the
sharded runs use them, and 1); the report it writes is opened in a real headless Chromium.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from harness import child_jax_settings

_ROOT = pathlib.Path(__file__).resolve().parents[1]
RECORD_FIELDS = {
  "task", "strategy", "placement", "optimizer", "lr", "seed", "threshold", "sweep", "steps",
  "initial_loss", "final_loss", "best_loss", "eval_loss", "diverged", "steps_to_target",
  "spike_count", "clipped_fraction", "over_clipped", "skipped_steps", "steps_per_second",
  "step_cost", "curves",
}  # fmt: skip
TIMING = {"steps_per_second", "step_cost"}


def run_cli(args, cwd, devices: int) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "CLIPCHAIN_"))}
  env.update(child_jax_settings(), JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices))
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")]))
  return subprocess.run(
    [sys.executable, "-m", "clipchain", "study", *args],
    cwd=cwd, env=env, capture_output=True, text=True, timeout=240,
  )  # fmt: skip


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  """The quick study on 8 devices and on 1, side by side (compiling is single-threaded):
  ``{devices: (completed process, out dir)}``."""
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    tmps = {devices: tmp_path_factory.mktemp(f"devices{devices}") for devices in (8, 1)}
    futures = {
      devices: pool.submit(run_cli, ["--quick", "--out", "study"], tmp, devices)
      for devices, tmp in tmps.items()
    }
    done = {}
    for devices, future in futures.items():
      result = future.result()
      assert result.returncode == 0, result.stderr[-3000:]
      done[devices] = (result, tmps[devices] / "study")
  return done


def test_quick_study_writes_every_output(quick):
  result, out = quick[8]
  assert sorted(p.name for p in out.iterdir()) == [
    "curves", "plots", "report.html", "report.md", "results.json",
  ]  # fmt: skip
  assert not list(out.parent.glob(".study*"))  # no staging or partial directory left behind
  assert "Report:" in result.stdout and "report.html" in result.stdout
  saved = json.loads((out / "results.json").read_text())
  assert saved["meta"]["args"]["quick"] is True
  assert len(saved["meta"]["devices"]) == 8
  runs = saved["runs"]
  assert runs and all(set(r) == RECORD_FIELDS for r in runs)
  assert {r["strategy"] for r in runs} == {"none", "global", "zclip"}
  for record in runs:
    assert isinstance(record["diverged"], bool)
    assert record["placement"] == "before" and record["optimizer"] == "sgd"
    path = out / record["curves"]["file"]
    with np.load(path) as curves:
      assert set(curves.files) == {
        "loss", "norm", "threshold", "clipped", "skipped", "lr", "seed", "eval_loss",
      }  # fmt: skip
      assert curves["loss"].shape[1] == record["steps"]
  text = (out / "report.md").read_text()
  for link in __import__("re").findall(r"\]\((plots/[^)]+)\)", text):
    assert (out / link).is_file()


def test_eight_devices_give_the_same_results_as_one(quick):
  (_, out8), (_, out1) = quick[8], quick[1]
  runs8 = json.loads((out8 / "results.json").read_text())["runs"]
  runs1 = json.loads((out1 / "results.json").read_text())["runs"]
  strip = lambda runs: [{k: v for k, v in r.items() if k not in TIMING} for r in runs]
  assert strip(runs8) == strip(runs1)
  for path in sorted((out8 / "curves").glob("*.npz")):
    with np.load(path) as a, np.load(out1 / "curves" / path.name) as b:
      for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{path.name}:{key}")


def test_report_renders_in_a_headless_browser(quick):
  from selenium import webdriver

  _, out = quick[8]
  chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
  assert chromium and driver_path, "make test installs chromium and chromium-driver"
  options = webdriver.ChromeOptions()
  options.binary_location = chromium
  for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
    options.add_argument(flag)
  options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
  driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver_path))
  try:
    driver.get((out / "report.html").as_uri())
    images = driver.execute_script(
      "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]);"
    )
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    title = driver.title
  finally:
    driver.quit()
  assert not errors, errors
  assert "clipchain" in title.lower()
  assert images, "the report shows its plots"
  for alt, complete, width in images:
    assert complete and width > 0, f"image {alt!r} did not load"

"""Smoke test of benchmarks/clip_step.py at its --quick sizes: structure and memory, not timing."""

import json
import math
import pathlib

import jax.numpy as jnp
import pytest
from harness import script_fixture

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "clip_step.py"


bench = script_fixture(_SCRIPT, "clip_step")


@pytest.fixture(scope="module")
def results(bench):
  return bench.run(repeats=2, warmup=1, blocks=1, quick=True)


def _rows(results, workload):
  (w,) = [w for w in results["workloads"] if w["workload"] == workload]
  return {v["variant"]: v for v in w["variants"]}, w


def test_every_workload_and_variant_is_reported(bench, results):
  assert results["quick"] is True
  assert [w["workload"] for w in results["workloads"]] == list(bench.QUICK_WORKLOADS)
  for w in results["workloads"]:
    chosen = getattr(bench.QUICK_WORKLOADS[w["workload"]], "variants", None)
    if chosen is None:  # all but the variants that need stacked leaves or attention projections
      chosen = [
        v
        for v in bench.VARIANTS
        if not v.startswith("scanned ") and v not in bench.WORKLOAD_SPECIFIC
      ]
    expected = [v for v in bench.VARIANTS if v == bench.BASELINE or v in chosen]
    assert [v["variant"] for v in w["variants"]] == [*expected, bench.CONTROL]
    assert w["repeats"] == 2
    workload = bench.QUICK_WORKLOADS[w["workload"]]
    assert w["grad_bytes"] == jnp.dtype(workload.dtype).itemsize * workload.size


@pytest.mark.parametrize("workload", ["large", "many", "bf16", "train", "stacked", "attention"])
def test_numbers_are_positive_and_finite(results, workload):
  rows, _ = _rows(results, workload)
  assert rows["adam"]["ratio"] == 1.0
  assert rows["adam"]["paired_ratio"] == 1.0
  for v in rows.values():
    for key in ("median_ms", "min_ms", "ratio", "paired_ratio", "compile_s"):
      assert math.isfinite(v[key]) and v[key] > 0, (v["variant"], key, v[key])
    assert len(v["times_ms"]) == 2
    assert v["fusions"] > 0
    assert v["argument_bytes"] > 0 and v["output_bytes"] > 0


@pytest.mark.parametrize("workload", ["large", "many", "bf16", "train"])
def test_every_variant_is_also_compared_with_the_fixed_clip(bench, results, workload):
  rows, _ = _rows(results, workload)
  assert rows[bench.CLIP_REFERENCE]["clip_paired_ratio"] == 1.0
  for v in rows.values():
    assert math.isfinite(v["clip_paired_ratio"]) and v["clip_paired_ratio"] > 0, v["variant"]
    assert v["clip_ratio"] == pytest.approx(
      v["median_ms"] / rows[bench.CLIP_REFERENCE]["median_ms"]
    )


@pytest.mark.parametrize("workload", ["large", "many"])
def test_clipchain_has_no_gradient_sized_temporary(results, workload):
  rows, w = _rows(results, workload)
  assert rows["clipchain clip + adam"]["temp_bytes"] < 0.5 * w["grad_bytes"]
  # The detector works: optax's clip materialises t / g * c, a buffer the size of the gradients.
  assert rows["optax clip + adam"]["temp_bytes"] >= w["grad_bytes"]
  # Donation holds: params and both Adam moments are updated in place.
  assert rows["clipchain clip + adam"]["alias_bytes"] >= 3 * w["grad_bytes"]


def test_bfloat16_temporaries_are_no_larger_than_optax(results):
  """XLA on CPU reduces bfloat16 through a float32 copy of each leaf, for any norm (optax's too):
  clipchain adds nothing beyond it but the one copy that the branch measuring an overflowed norm
  again (a ``lax.cond`` taken only then) is given, and Adam alone has none."""
  rows, w = _rows(results, "bf16")
  assert rows["adam"]["temp_bytes"] < 0.01 * w["grad_bytes"]
  leaf_copy = 2 * w["grad_bytes"] // 8  # one of the 8 bfloat16 leaves, in float32
  optax_temp = rows["optax clip + adam"]["temp_bytes"]
  assert rows["clipchain clip + adam"]["temp_bytes"] <= optax_temp + leaf_copy + 2**12
  assert rows["clipchain clip + adam"]["alias_bytes"] >= 3 * w["grad_bytes"]


def test_every_compiled_step_is_within_its_recorded_budget(bench, results):
  """No change adds kernels or a temporary unnoticed: the fusions and temporaries of every
  variant at the --quick sizes stay within benchmarks/budget.json (`clip_step.py --check`)."""
  with open(bench.BUDGET) as f:
    assert bench.over_budget(results, json.load(f)) == []


def test_the_budget_check_catches_an_extra_kernel_or_temporary(bench, results):
  budget = bench.structure(results)
  row = budget["large"]["clipchain clip + adam"]
  row["fusions"] -= 1
  row["temp_over_grads"] -= 1.0
  problems = bench.over_budget(results, budget)
  assert len(problems) == 2 and all("clipchain clip + adam" in p for p in problems)


def test_identical_programs_have_identical_memory_and_fusions(results):
  for w in results["workloads"]:
    rows = {v["variant"]: v for v in w["variants"]}
    for key in ("fusions", "temp_bytes", "argument_bytes", "output_bytes", "alias_bytes"):
      assert rows["adam"][key] == rows["adam (control)"][key]


def test_markdown_names_the_machine_and_every_row(bench, results):
  text = bench.markdown(results)
  assert text.startswith("Machine: ")
  for w in results["workloads"]:
    for v in w["variants"]:
      assert f"| {v['variant']} |" in text


def test_command_line_writes_json(bench, tmp_path, capsys):
  path = tmp_path / "out.json"
  bench.main(
    [
      "--quick",
      "--workloads",
      "large",
      "--variants",
      "clipchain clip + adam",
      "--no-control",
      "--repeats",
      "2",
      "--warmup",
      "0",
      "--json",
      str(path),
    ]
  )
  saved = json.loads(path.read_text())
  assert [v["variant"] for v in saved["workloads"][0]["variants"]] == [
    "adam",
    "clipchain clip + adam",
  ]
  assert "| clipchain clip + adam |" in capsys.readouterr().out

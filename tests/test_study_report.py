"""The study report from hand-made runs and curves: its ranking, its rule, and its two files."""

import base64
import re

import numpy as np
import pytest

from clipchain.study import report

# A plot that warns (a log axis with nothing positive on it, an empty mean) fails the test.
pytestmark = pytest.mark.filterwarnings("error")

LRS = (1e-3, 1e-2, 1e-1)
STEPS = 40
PNG = b"\x89PNG\r\n\x1a\n"


def _run(strategy, lr, final, *, seed=0, placement="before", optimizer="sgd", task="toy", **kw):
  """One record; ``final`` None means the run diverged."""
  return dict(
    task=task,
    strategy=strategy,
    placement=placement,
    optimizer=optimizer,
    lr=lr,
    seed=seed,
    threshold={"rule": "fixed", "value": 1.0, "multiplier": kw.pop("multiplier", 1.0)},
    sweep=kw.pop("sweep", False),
    initial_loss=1.0,
    final_loss=final,
    best_loss=final,
    eval_loss=kw.pop("eval_loss", None if final is None else 1.1 * final),
    diverged=final is None,
    steps_to_target=None if final is None or final > 0.5 else 12 + seed,
    spike_count=3 if final is None else 0,
    clipped_fraction=0.0 if strategy == "none" else 0.25,
    skipped_steps=0,
    steps_per_second=100.0,
    step_cost=1.0 if strategy == "none" else 1.2,
    curves=kw.pop("curves", None),
  )


def _curve(final, step_count=STEPS):
  t = np.arange(step_count, dtype=np.float64)
  if final is None:
    loss = np.exp(t / 4.0)
    loss[step_count // 2 :] = np.nan
  else:
    loss = final + (1.0 - final) * np.exp(-t / 5.0)
  norm = 1.0 + 0.8 * np.abs(np.sin(t)) + (0.0 if final is not None else t)
  return loss, norm


def _study(
  tmp_path,
  outcome,
  *,
  tasks=("toy",),
  optimizers=("sgd", "adam"),
  strategies=None,
  placements=("before", "after"),
  lrs=LRS,
  seeds=(0, 1),
  multipliers=(1.0,),
):
  """Writes one ``.npz`` per cell under ``tmp_path/curves`` and returns the records.

  ``outcome(task, optimizer, strategy, placement, multiplier, lr, seed)`` gives the final loss, or
  None for a diverged run. Multipliers other than 1 are the global clip's sweep (placement before).
  """
  strategies = strategies or ("none", "global", "zclip")
  (tmp_path / "curves").mkdir(exist_ok=True)
  runs = []
  cells = [
    (task, opt, s, p, 1.0)
    for task in tasks
    for opt in optimizers
    for s in strategies
    for p in placements
  ]
  cells += [
    (task, opt, "global", "before", m)
    for task in tasks
    for opt in optimizers
    for m in multipliers
    if m != 1.0
  ]
  for task, opt, s, p, m in cells:
    name = f"curves/{task}-{opt}-{s.replace('/', '_')}-{p}-x{m:g}.npz"
    arrays = {k: [] for k in ("loss", "norm", "threshold", "clipped", "lr", "seed")}
    for lr in lrs:
      for seed in seeds:
        final = outcome(task, opt, s, p, m, lr, seed)
        loss, norm = _curve(final)
        threshold = np.full(STEPS, 1.5 * m if s == "global" else np.nan)
        arrays["loss"].append(loss)
        arrays["norm"].append(norm)
        arrays["threshold"].append(threshold)
        arrays["clipped"].append(norm > np.nan_to_num(threshold, nan=np.inf))
        arrays["lr"].append(lr)
        arrays["seed"].append(seed)
        runs.append(
          _run(
            s,
            lr,
            final,
            seed=seed,
            placement=p,
            optimizer=opt,
            task=task,
            multiplier=m,
            sweep=m != 1.0,
            curves={"file": name, "index": len(arrays["lr"]) - 1},
          )
        )
    np.savez(
      tmp_path / name,
      loss=np.asarray(arrays["loss"], np.float32),
      norm=np.asarray(arrays["norm"], np.float32),
      threshold=np.asarray(arrays["threshold"], np.float32),
      clipped=np.asarray(arrays["clipped"], bool),
      lr=np.asarray(arrays["lr"], np.float32),
      seed=np.asarray(arrays["seed"], np.int32),
    )
  return runs


def _meta(tasks=("toy",)):
  return {
    "clipchain": "0.0.test",
    "jax": "0.7",
    "optax": "0.2.5",
    "flax": None,
    "devices": ["cpu:0"],
    "process_count": 1,
    "args": {"tasks": list(tasks), "seeds": 2},
    "tasks": {
      t: {"description": f"A <tiny> {t} task.", "target_loss": 0.5, "steps": STEPS} for t in tasks
    },
    "metrics": {
      "final_fraction": 0.1,
      "divergence_factor": 2.0,
      "target_window": 10,
      "spike_window": 20,
      "spike_factor": 2.0,
    },
    "started": "2025-01-01T00:00:00",
    "seconds": 12.5,
  }


def _typical(task, opt, s, p, m, lr, seed):
  """none diverges at the top lr in every seed; global and zclip hold it; sweep x4 breaks."""
  if s == "none":
    return None if lr == 1e-1 else 0.3 + lr
  if m == 4.0 and lr >= 1e-2:
    return None
  if m == 0.5:
    return 0.45
  if s == "zclip" and p == "after" and lr == 1e-1:
    return None
  return 0.2 + lr + (0.01 if s == "zclip" else 0.0)


def _write(tmp_path, runs, meta=None):
  paths = report.write_report(runs, meta or _meta(), tmp_path, dpi=40)
  return paths["md"].read_text(), paths["html"].read_text()


def test_rank_puts_lower_final_loss_first_then_more_stable_lrs():
  runs = [_run("a", lr, 0.9) for lr in LRS]  # 3 stable lrs, worst loss
  runs += [_run("b", lr, 0.1 if lr < 0.1 else None) for lr in LRS]  # 2 stable, best loss
  runs += [_run("c", lr, 0.5) for lr in LRS]  # 3 stable, better loss than a
  runs += [_run("d", lr, 0.5 if lr < 0.1 else None) for lr in LRS]  # c's loss, 2 stable
  runs += [_run("none", lr, None) for lr in LRS]
  rows = report.rank(runs)
  assert [r.strategy for r in rows] == ["b", "c", "d", "a", "none"]
  assert [r.stable_count for r in rows] == ["2/3", "3/3", "2/3", "3/3", "0/3"]
  assert [r.stable_range for r in rows][:2] == ["0.001..0.01", "0.001..0.1"]
  assert rows[0].best_final == pytest.approx(0.1)
  assert rows[-1].best_final is None and rows[-1].best_lr is None


def test_a_strategy_stable_everywhere_that_does_not_learn_is_not_recommended():
  runs = [_run("none", lr, 0.2 if lr < 0.1 else None) for lr in LRS]
  runs += [_run("unit", lr, 0.9) for lr in LRS]  # never diverges, never learns
  runs += [_run("global", lr, 0.195 if lr < 0.1 else None) for lr in LRS]  # as good as none
  runs += [_run("zclip", lr, 0.2) for lr in LRS]  # as good as none, and stable at lr 0.1 too
  rec = report.recommend(report.rank(runs))
  assert rec.verdict == "helps" and rec.recommended.strategy == "zclip"
  assert "widens the stable range by 1 lr" in rec.text
  assert [row.strategy for row, _ in rec.worse] == ["unit"]


def test_one_diverged_seed_makes_an_lr_unstable_and_gaps_are_marked():
  runs = [_run("s", lr, 0.4, seed=0) for lr in LRS]
  runs += [_run("s", lr, None if lr == 1e-2 else 0.2, seed=1) for lr in LRS]
  (row,) = report.rank(runs)
  assert row.stable_lrs == (1e-3, 1e-1)
  assert row.stable_range == "0.001..0.1 (with gaps)"
  assert row.best_final == pytest.approx(0.3)  # mean over seeds at the best lr
  assert row.steps_to_target == pytest.approx(12.5)  # median of seeds 0 and 1


def test_steps_to_target_is_a_dash_when_the_median_seed_never_reaches_it():
  runs = [_run("s", 1e-3, 0.4, seed=0), _run("s", 1e-3, 0.9, seed=1), _run("s", 1e-3, 0.9, seed=2)]
  (row,) = report.rank(runs)
  assert row.steps_to_target is None


def test_recommendation_when_clipping_helps():
  runs = [_run("none", lr, None if lr > 1e-3 else 0.5) for lr in LRS]
  runs += [_run("global", lr, 0.4) for lr in LRS]
  runs += [_run("zclip", lr, 0.45 if lr < 0.1 else None) for lr in LRS]
  runs += [_run("unit", lr, 0.41, placement="after") for lr in LRS]
  rec = report.recommend(report.rank(runs))
  assert rec.verdict == "helps"
  assert rec.recommended.strategy == "global"
  assert rec.text.startswith("Recommended: global (before), stable at 3/3 lrs (0.001..0.1)")
  assert "widens the stable range by 2 lrs over none, highest stable lr 0.1 (100x none's)" in (
    rec.text
  )
  assert "As good by this rule (as many stable lrs, best final loss within 5%): unit." in rec.text
  assert rec.worse == ()


def test_recommendation_when_clipping_made_no_difference():
  runs = [_run("none", lr, 0.50) for lr in LRS]
  runs += [_run("global", lr, 0.49) for lr in LRS]
  runs += [_run("zclip", lr, 0.52) for lr in LRS]
  rec = report.recommend(report.rank(runs))
  assert rec.verdict == "no difference"
  assert rec.recommended is None
  assert rec.text.startswith("Clipping made no difference")
  assert "worse" not in rec.text


def test_recommendation_when_clipping_made_things_worse():
  runs = [_run("none", lr, 0.50) for lr in LRS]
  runs += [_run("global", lr, 0.50 if lr < 0.1 else None) for lr in LRS]  # fewer stable lrs
  runs += [_run("zclip", lr, 0.60) for lr in LRS]  # 20 % higher loss
  runs += [_run("unit", lr, 0.51) for lr in LRS]  # within 5 %: neither
  rec = report.recommend(report.rank(runs))
  assert rec.verdict == "no difference"  # unit neither helped nor hurt
  assert [row.strategy for row, _ in rec.worse] == ["global", "zclip"]
  assert "Clipping made things worse with: global (before)" in rec.text
  assert "zclip (before): best final loss 0.6 vs 0.5 (+20%)" in rec.text
  assert "global (before): stable at 2/3 lrs vs 3/3 without clipping" in rec.text
  rec_all_worse = report.recommend(report.rank([r for r in runs if r["strategy"] != "unit"]))
  assert rec_all_worse.verdict == "worse"


def test_recommendation_without_baseline_or_with_only_none():
  only_none = report.recommend(report.rank([_run("none", lr, 0.5) for lr in LRS]))
  assert only_none.verdict == "only none"
  no_base = report.recommend(report.rank([_run("global", lr, 0.5) for lr in LRS]))
  assert no_base.verdict == "no baseline" and "No unclipped baseline" in no_base.text


def test_instability_needs_every_seed_to_diverge_somewhere():
  exploded = [_run("none", lr, None if lr == 0.1 else 0.5, seed=s) for lr in LRS for s in (0, 1)]
  verdict, text = report.instability(exploded)
  assert verdict is True and text.startswith("Yes: without clipping every seed (2) diverged")
  assert "sgd: diverged at lr 0.1" in text
  one_seed = [
    _run("none", lr, None if (lr, s) == (0.1, 1) else 0.5, seed=s) for lr in LRS for s in (0, 1)
  ]
  verdict, text = report.instability(one_seed)
  assert verdict is False and text.startswith("No: without clipping only 1 of 2 seeds")
  assert report.instability([_run("global", 0.1, 0.5)])[0] is None


def test_full_report(tmp_path):
  runs = _study(tmp_path, _typical, multipliers=(0.5, 1.0, 2.0, 4.0))
  md, page = _write(tmp_path, runs)

  # The sweep: x4 diverges at two lrs, x0.5 has a higher loss, x2 ties x1 and the tighter clip wins.
  assert "sgd: the best multiplier is x1, stable at 3/3 lrs (0.001..0.1)" in md
  assert "adam: the best multiplier is x1" in page
  # Sweep runs stay out of the main tables: global keeps its 3/3 and the x4 failures do not count.
  assert "| 1 | global | before | 3/3 | 0.001..0.1 | 0.201 | 0.001 | 12.5 |" in md
  assert "toy" in md and "Yes: without clipping every seed (2) diverged" in md
  assert "Recommended: global (before), stable at 3/3 lrs" in md
  assert "zclip (after): stable at 2/3 lrs vs 2/3" not in md  # none and zclip-after tie at 2/3

  # report.md links only plot files that exist.
  links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
  assert len(links) >= 6
  for link in links:
    assert (tmp_path / link).is_file() and link.startswith("plots/")
  assert sorted(links) == sorted(f"plots/{p.name}" for p in (tmp_path / "plots").iterdir())

  # report.html is one self-contained page.
  assert page.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in page
  assert "<title>clipchain study report</title>" in page
  assert "<script" not in page and 'src="http' not in page and "href=" not in page
  assert "A &lt;tiny&gt; toy task." in page and "<tiny>" not in page
  imgs = re.findall(r"<img [^>]*>", page)
  assert len(imgs) == len(links)
  for tag in imgs:
    src = re.search(r'src="([^"]+)"', tag).group(1)
    assert src.startswith("data:image/png;base64,")
    assert base64.b64decode(src.split(",", 1)[1], validate=True).startswith(PNG)
    assert re.search(r'alt="[^"]+"', tag)

  # Both files come from the same blocks: the same recommendations in each.
  recs = re.findall(r"^- (?:sgd|adam): ((?:Recommended|Clipping|No ).*)$", md, re.M)
  assert len(recs) == 2
  for rec in recs:
    assert rec.replace("\\", "") in page.replace("&#x27;", "'")


def test_report_is_byte_stable(tmp_path):
  runs = _study(tmp_path, _typical, optimizers=("sgd",), placements=("before",))
  first = {p: p.read_bytes() for p in report.write_report(runs, _meta(), tmp_path, dpi=40).values()}
  plots = {p: p.read_bytes() for p in (tmp_path / "plots").iterdir()}
  second = report.write_report(runs, _meta(), tmp_path, dpi=40)
  assert {p: p.read_bytes() for p in second.values()} == first
  assert {p: p.read_bytes() for p in (tmp_path / "plots").iterdir()} == plots


@pytest.mark.parametrize(
  "case",
  ["all_diverged", "only_none", "single_lr_seed", "no_none", "unknown_only_after", "no_eval"],
)
def test_edge_cases_render(tmp_path, case):
  kw = dict(optimizers=("sgd",), seeds=(0,) if case == "single_lr_seed" else (0, 1))
  outcome = _typical
  if case == "all_diverged":
    outcome = lambda *a: None
  elif case == "only_none":
    kw["strategies"] = ("none",)
  elif case == "single_lr_seed":
    kw["lrs"] = (0.1,)
  elif case == "no_none":
    kw["strategies"] = ("global", "zclip")
  elif case == "unknown_only_after":
    kw.update(strategies=("none", "my-clip/v2"), placements=("after",))
  runs = _study(tmp_path, outcome, **kw)
  if case == "no_eval":
    for run in runs:
      run["eval_loss"] = None
  md, page = _write(tmp_path, runs)
  assert "</html>" in page and "## Task toy" in md
  for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
    assert (tmp_path / link).is_file()
  if case == "all_diverged":
    assert "| none | before | 0/3 | none | — | — | — | — |" in md
    assert "every run diverged at every lr, with or without clipping" in md
  if case == "only_none":
    assert "Only the unclipped baseline was run." in md
  if case == "no_none":
    assert "Not known: the unclipped baseline none was not run" in md
  if case == "unknown_only_after":
    assert "my-clip/v2" in md and "placement after" in md


def test_report_with_no_runs(tmp_path):
  md, page = _write(tmp_path, [], meta={})
  assert "There are no runs to recommend from." in md and "</html>" in page


def test_curves_missing_do_not_crash(tmp_path):
  runs = _study(tmp_path, _typical, optimizers=("sgd",), placements=("before",))
  for i, path in enumerate(sorted((tmp_path / "curves").iterdir())):
    if i % 2:
      path.unlink()
    else:
      path.write_bytes(b"not a zip file")
  md, _ = _write(tmp_path, runs)
  assert "4. Loss and gradient norm over time" in md


def test_summary_table_is_short_and_marks_the_recommendation():
  names = report.KNOWN_STRATEGIES
  runs = [
    _run(s, lr, None if (s == "none" and lr == 0.1) else 0.3 + 0.01 * i, optimizer=opt, placement=p)
    for i, s in enumerate(names)
    for lr in LRS
    for opt in ("sgd", "adam")
    for p in ("before", "after")
  ]
  text = report.summary_table(runs)
  lines = text.splitlines()
  assert len(lines) <= 40
  assert "after" not in text  # placement before only
  marked = [line for line in lines if "*" in line]
  assert len(marked) == 2 and all(" value " in line for line in marked)  # 3/3 and lowest loss
  assert re.search(r"none\s+2/3\s+0\.3$", text, re.M)


def test_sweep_picks_the_most_stable_multiplier_among_equally_good_losses(tmp_path):
  runs = [_run("global", lr, 0.300, multiplier=0.25, sweep=True) for lr in LRS]  # 3/3 stable
  runs += [_run("global", lr, 0.301 if lr < 0.1 else None) for lr in LRS]  # x1: 2/3
  runs += [_run("global", lr, 0.299 if lr < 0.01 else None, multiplier=4.0, sweep=True)
           for lr in LRS]  # fmt: skip
  runs += [_run("none", lr, 0.3) for lr in LRS]
  paths = report.write_report(runs, {"metrics": {}}, tmp_path, dpi=40)
  text = paths["md"].read_text()
  assert "sgd: the best multiplier is x0.25, stable at 3/3 lrs" in text


def test_a_wider_stable_range_is_reported_with_the_loss_reached_there():
  runs = [_run("none", lr, 0.2 if lr < 0.1 else None) for lr in LRS]
  runs += [_run("global", lr, 0.19 if lr < 0.1 else 0.9) for lr in LRS]
  rec = report.recommend(report.rank(runs))
  assert rec.recommended.strategy == "global"
  assert "widens the stable range by 1 lr over none" in rec.text
  assert "(final loss 0.9 at lr 0.1)" in rec.text

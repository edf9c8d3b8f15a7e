"""The study report from hand-made runs and curves: its ranking, its rule, its intervals over
seeds, and its two files."""

import base64
import re

import numpy as np
import pytest

from clipchain.study import analysis, report
from clipchain.study.record import as_records

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
    spike_count=kw.pop("spikes", 3 if final is None else 0),
    clipped_fraction=0.0 if strategy == "none" else 0.25,
    over_clipped=kw.pop("over_clipped", False),
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
      "spike_sigmas": 6.0,
      "spike_floor": 0.1,
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


def _rank(runs):
  return analysis.rank(as_records(runs))


def _recommend(runs):
  return analysis.recommend(_rank(runs))


def test_rank_puts_lower_final_loss_first_then_more_stable_lrs():
  runs = [_run("a", lr, 0.9) for lr in LRS]  # 3 stable lrs, worst loss
  runs += [_run("b", lr, 0.1 if lr < 0.1 else None) for lr in LRS]  # 2 stable, best loss
  runs += [_run("c", lr, 0.5) for lr in LRS]  # 3 stable, better loss than a
  runs += [_run("d", lr, 0.5 if lr < 0.1 else None) for lr in LRS]  # c's loss, 2 stable
  runs += [_run("none", lr, None) for lr in LRS]
  rows = _rank(runs)
  assert [r.strategy for r in rows] == ["b", "c", "d", "a", "none"]
  assert [r.stable_count for r in rows] == ["2/3", "3/3", "2/3", "3/3", "0/3"]
  assert [r.stable_range for r in rows][:2] == ["0.001..0.01", "0.001..0.1"]
  assert rows[0].best_final == pytest.approx(0.1)
  assert rows[-1].best_final is None and rows[-1].best_lr is None and rows[-1].baseline


def test_the_baseline_has_one_row_whatever_the_placements():
  runs = [_run("none", lr, 0.5, placement=p) for lr in LRS for p in ("before", "after")]
  runs += [_run("global", lr, 0.4, placement="after") for lr in LRS]
  rows = _rank(runs)
  assert [(r.strategy, r.placement) for r in rows] == [("global", "after"), ("none", "before")]


def test_a_strategy_stable_everywhere_that_does_not_learn_is_not_recommended():
  runs = [_run("none", lr, 0.2 if lr < 0.1 else None, seed=s) for lr in LRS for s in (0, 1, 2)]
  runs += [_run("unit", lr, 0.9, seed=s) for lr in LRS for s in (0, 1, 2)]  # never learns
  runs += [_run("global", lr, 0.195 if lr < 0.1 else None, seed=s) for lr in LRS for s in (0, 1, 2)]
  runs += [_run("zclip", lr, 0.2, seed=s) for lr in LRS for s in (0, 1, 2)]  # also stable at 0.1
  rec = _recommend(runs)
  assert rec.verdict == "helps" and rec.recommended.strategy == "zclip"
  assert "+1 stable lrs (+1 [+1, +1] over seeds) where it reaches final loss 0.2 at lr 0.1" in (
    rec.text
  )
  assert [row.strategy for row, _ in rec.worse] == ["unit"]
  assert "unit (before): best final loss 0.9 vs 0.2 (+350% [+350%, +350%])" in rec.text


def test_one_diverged_seed_makes_an_lr_unstable_and_gaps_are_marked():
  runs = [_run("s", lr, 0.4, seed=0) for lr in LRS]
  runs += [_run("s", lr, None if lr == 1e-2 else 0.2, seed=1) for lr in LRS]
  (row,) = _rank(runs)
  assert row.stable_lrs == (1e-3, 1e-1)
  assert row.stable_range == "0.001..0.1 (with gaps)"
  assert row.best_final == pytest.approx(0.3)  # mean over seeds at the best lr
  assert row.steps_to_target == pytest.approx(12.5)  # median of seeds 0 and 1


def test_steps_to_target_is_a_dash_when_the_median_seed_never_reaches_it():
  runs = [_run("s", 1e-3, 0.4, seed=0), _run("s", 1e-3, 0.9, seed=1), _run("s", 1e-3, 0.9, seed=2)]
  (row,) = _rank(runs)
  assert row.steps_to_target is None


def _bootstrap_reference(a, b, resamples=analysis.BOOTSTRAP_RESAMPLES):
  """The percentile interval of mean(a - b) over seeds resampled with replacement, by hand."""
  rng = np.random.default_rng(0)
  a, b = np.asarray(a, float), np.asarray(b, float)
  picks = rng.integers(0, len(a), (resamples, len(a)))
  values = np.sort((a[picks] - b[picks]).mean(axis=1))
  k = resamples * 0.025
  return values[int(np.ceil(k)) - 1], values[int(np.ceil(resamples * 0.975)) - 1]


def test_bootstrap_interval_is_the_percentile_interval_over_resampled_seeds():
  a = {0: 1.0, 1: 3.0, 2: 2.0, 3: 7.0}
  b = {0: 0.5, 1: 1.0, 2: 2.5, 3: 2.0}
  interval = analysis.bootstrap(lambda s: float(np.mean([a[i] - b[i] for i in s])), list(a))
  low, high = _bootstrap_reference(list(a.values()), list(b.values()))
  assert interval.value == pytest.approx(np.mean([0.5, 2.0, -0.5, 5.0]))
  assert (interval.low, interval.high) == (pytest.approx(low), pytest.approx(high))
  assert interval.resolved == (low > 0 or high < 0)
  same = analysis.bootstrap(lambda s: 0.0, [0, 1, 2])
  assert (same.low, same.high) == (0.0, 0.0) and not same.resolved


def test_recommendation_when_clipping_helps_in_every_seed():
  seeds = (0, 1, 2)
  runs = [_run("none", lr, None if lr > 1e-3 else 0.5, seed=s) for lr in LRS for s in seeds]
  runs += [_run("global", lr, 0.4, seed=s) for lr in LRS for s in seeds]
  runs += [_run("zclip", lr, 0.45 if lr < 0.1 else None, seed=s) for lr in LRS for s in seeds]
  runs += [_run("unit", lr, 0.41, placement="after", seed=s) for lr in LRS for s in seeds]
  rec = _recommend(runs)
  assert rec.verdict == "helps"
  assert rec.recommended.strategy == "global"
  assert rec.text.startswith(
    "Recommended: global (before), stable at 3/3 lrs (0.001..0.1), best final loss 0.4 "
    "(-20% [-20%, -20%] vs none); +2 stable lrs (+2 [+2, +2] over seeds)"
  )
  assert "Also resolved better: unit (after), zclip (before)." in rec.text
  assert rec.worse == ()


def test_a_difference_that_one_seed_does_not_share_is_not_resolved():
  # none diverges at the top lr in seed 0 only: the gain in stable lrs is 1 on the full set of
  # seeds but 0 on every resample without seed 0, so the interval includes zero.
  runs = [
    _run("none", lr, None if (lr, s) == (0.1, 0) else 0.5, seed=s) for lr in LRS for s in (0, 1, 2)
  ]
  runs += [_run("global", lr, 0.5, seed=s) for lr in LRS for s in (0, 1, 2)]
  rec = _recommend(runs)
  (row,) = [r for r in _rank(runs) if r.strategy == "global"]
  assert row.stable_gain.value == 1 and row.stable_gain.low == 0 and not row.stable_gain.resolved
  assert rec.verdict == "indistinguishable" and rec.recommended is None
  assert rec.text.startswith("Indistinguishable from no clipping")


def test_a_lower_loss_in_some_seeds_only_is_indistinguishable():
  finals = {0: 0.30, 1: 0.55, 2: 0.62}  # none's loss 0.5 in every seed: better, worse, worse
  runs = [_run("none", lr, 0.5, seed=s) for lr in LRS for s in finals]
  runs += [_run("global", lr, finals[s], seed=s) for lr in LRS for s in finals]
  (row,) = [r for r in _rank(runs) if r.strategy == "global"]
  assert row.loss_change.low < 0 < row.loss_change.high
  assert _recommend(runs).verdict == "indistinguishable"


def test_recommendation_when_clipping_made_things_worse():
  runs = [_run("none", lr, 0.50) for lr in LRS]
  runs += [_run("global", lr, 0.50 if lr < 0.1 else None) for lr in LRS]  # fewer stable lrs
  runs += [_run("zclip", lr, 0.60) for lr in LRS]  # 20 % higher loss
  runs += [_run("unit", lr, 0.51) for lr in LRS]  # within 5 %: neither
  rec = _recommend(runs)
  assert rec.verdict == "indistinguishable"  # unit neither helped nor hurt
  assert [row.strategy for row, _ in rec.worse] == ["global", "zclip"]
  assert "Resolved worse than no clipping: global (before)" in rec.text
  assert "zclip (before): best final loss 0.6 vs 0.5 (+20% [+20%, +20%])" in rec.text
  assert "global (before): stable at 2/3 lrs vs 3/3 without clipping" in rec.text
  all_worse = _recommend([r for r in runs if r["strategy"] != "unit"])
  assert all_worse.verdict == "worse"


def test_over_clipped_runs_are_named_beside_the_verdict():
  runs = [_run("none", lr, 0.5) for lr in LRS]
  runs += [_run("global", lr, 0.5, over_clipped=lr == 1e-3) for lr in LRS]
  rec = _recommend(runs)
  assert rec.worse == () and rec.verdict == "indistinguishable"
  assert rec.text.endswith(
    "Over-clipped (the clip changed nearly every step and the loss ended above no clipping's at "
    "the same lr and seed): global (before) in 1 of 3 runs."
  )


def test_recommendation_without_baseline_or_with_only_none():
  only_none = _recommend([_run("none", lr, 0.5) for lr in LRS])
  assert only_none.verdict == "only baseline"
  no_base = _recommend([_run("global", lr, 0.5) for lr in LRS])
  assert no_base.verdict == "no baseline" and "No unclipped baseline" in no_base.text


def _infos(runs):
  return analysis.strategy_infos({}, {r["strategy"] for r in runs})


def test_instability_needs_every_seed_to_diverge_somewhere():
  exploded = [_run("none", lr, None if lr == 0.1 else 0.5, seed=s) for lr in LRS for s in (0, 1)]
  verdict, text = analysis.instability(as_records(exploded), _infos(exploded))
  assert verdict is True
  assert text.startswith("Yes: without clipping every seed (2) diverged or spiked")
  assert "sgd: diverged at lr 0.1 in 2/2 seeds" in text
  one_seed = [
    _run("none", lr, None if (lr, s) == (0.1, 1) else 0.5, seed=s) for lr in LRS for s in (0, 1)
  ]
  verdict, text = analysis.instability(as_records(one_seed), _infos(one_seed))
  assert verdict is False and text.startswith(
    "No: without clipping 1 of 2 seeds diverged or spiked"
  )
  only_global = [_run("global", 0.1, 0.5)]
  assert analysis.instability(as_records(only_global), _infos(only_global))[0] is None


def test_rescues_list_settings_where_none_spikes_and_a_strategy_does_not():
  seeds = (0, 1, 2)
  runs = [_run("none", lr, 0.5, spikes=4 if lr == 0.1 else 0, seed=s) for lr in LRS for s in seeds]
  runs += [_run("zclip", lr, 0.45, spikes=s % 2, seed=s) for lr in LRS for s in seeds]
  runs += [_run("global", lr, None if lr == 0.1 else 0.5, seed=s) for lr in LRS for s in seeds]
  (rescue,) = analysis.rescues(as_records(runs), _infos(runs))
  assert (rescue.optimizer, rescue.lr, rescue.strategy, rescue.placement) == (
    "sgd",
    0.1,
    "zclip",
    "before",
  )
  assert rescue.baseline_spikes == 4 and rescue.spikes == pytest.approx(1 / 3)
  low, high = _bootstrap_reference([0, 1, 0], [4, 4, 4])
  assert rescue.spike_change.value == pytest.approx(-11 / 3)
  assert (rescue.spike_change.low, rescue.spike_change.high) == (
    pytest.approx(low),
    pytest.approx(high),
  )


def test_the_zclip_ordering_is_checked_at_the_lrs_where_none_fails():
  from clipchain.study.strategies import PAPER_COMPARISONS

  (zclip,) = [c.to_json() for c in PAPER_COMPARISONS]
  seeds = (0, 1, 2)
  runs = [
    _run("none", lr, None if lr == 0.1 else 0.5, seed=s, optimizer="adam")
    for lr in LRS
    for s in seeds
  ]
  runs += [
    _run("global", lr, None if (lr, s) == (0.1, 0) else 0.5, seed=s, optimizer="adam", spikes=1)
    for lr in LRS
    for s in seeds
  ]
  runs += [_run("zclip", lr, 0.45, seed=s, optimizer="adam") for lr in LRS for s in seeds]
  check = analysis.check_ordering(as_records(runs), zclip, "adam")
  assert check.lrs == (0.1,) and check.held == (True, True)
  assert check.table[0][:3] == ("zclip", 0, 3) and check.table[2][:3] == ("none", 3, 3)
  assert "the ordering zclip ≤ global ≤ none held" in check.text
  # Fewer spikes for the fixed clip than for ZClip: that pair of the ordering fails.
  worse = [r | {"spike_count": 5} if r["strategy"] == "zclip" else r for r in runs]
  check = analysis.check_ordering(as_records(worse), zclip, "adam")
  assert check.held == (False, True) and "held only in part" in check.text
  assert analysis.check_ordering(as_records(runs[:9]), zclip, "adam") is None  # zclip missing


def test_full_report(tmp_path):
  runs = _study(tmp_path, _typical, multipliers=(0.5, 1.0, 2.0, 4.0))
  md, page = _write(tmp_path, runs)

  # It leads with the answer: the summary table comes before any definition or argument.
  assert md.index("| optimizer | use | placement |") < md.index("## Definitions")
  assert md.index("## Definitions") < md.index("## What was run")
  assert "| sgd | global | before | -33% \\[-33%, -33%\\] | 3/3 vs 2/3 | +1 \\[+1, +1\\] |" in md
  # The sweep: x4 diverges at two lrs, x0.5 has a higher loss, x2 ties x1 and the tighter clip wins.
  assert "sgd: the best multiplier is x1, stable at 3/3 lrs (0.001..0.1)" in md
  assert "adam: the best multiplier is x1" in page
  # Sweep runs stay out of the main tables: global keeps its 3/3 and the x4 failures do not count.
  assert "| 1 | global | before | 3/3 | 0.001..0.1 | 0.201 | 0.001 |" in md
  assert "toy" in md and "Yes: without clipping every seed (2) diverged or spiked" in md
  assert "Recommended: global (before), stable at 3/3 lrs" in md

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
  recs = re.findall(r"^((?:Recommended|Indistinguishable).*)$", md, re.M)
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
    assert "| none | before | 0/3 | — | — | — | — | — |" in md
    assert "every strategy worse" not in md and "indistinguishable from no clipping" in md
  if case == "only_none":
    assert "Only the unclipped baseline was run." in md
  if case == "no_none":
    assert "Not known: the unclipped baseline was not run" in md
  if case == "unknown_only_after":
    assert "my-clip/v2" in md and "placement after" in md


def test_report_with_no_runs(tmp_path):
  md, page = _write(tmp_path, [], meta={})
  assert "There are no runs to report." in md and "</html>" in page


def test_curves_missing_do_not_crash(tmp_path):
  runs = _study(tmp_path, _typical, optimizers=("sgd",), placements=("before",))
  for i, path in enumerate(sorted((tmp_path / "curves").iterdir())):
    if i % 2:
      path.unlink()
    else:
      path.write_bytes(b"not a zip file")
  md, _ = _write(tmp_path, runs)
  assert "Loss and the norm the clip sees, over time" in md


def test_summary_table_is_short_and_names_the_recommendation():
  from clipchain.study.strategies import STRATEGIES

  names = [s for s in STRATEGIES if s not in ("stable-adamw", "global-subset")]
  runs = [
    _run(s, lr, None if (s == "none" and lr == 0.1) else 0.3 + 0.01 * i, optimizer=opt,
         placement=p, seed=seed)
    for i, s in enumerate(names)
    for lr in LRS
    for opt in ("sgd", "adam")
    for p in ("before", "after")
    for seed in (0, 1, 2)
  ]  # fmt: skip
  text = report.summary_table(runs)
  lines = text.splitlines()
  assert len(lines) == 3  # a header and one line per task and optimizer
  # value has the lowest loss among those stable at 3/3.
  assert all(re.search(r"value \(before\)\s+3/3 vs 2/3\s+\+3% \[\+3%, \+3%\]\s+helps$", line)
             for line in lines[1:])  # fmt: skip


def test_sweep_picks_the_most_stable_multiplier_among_equally_good_losses(tmp_path):
  runs = [_run("global", lr, 0.300, multiplier=0.25, sweep=True) for lr in LRS]  # 3/3 stable
  runs += [_run("global", lr, 0.301 if lr < 0.1 else None) for lr in LRS]  # x1: 2/3
  runs += [_run("global", lr, 0.299 if lr < 0.01 else None, multiplier=4.0, sweep=True)
           for lr in LRS]  # fmt: skip
  runs += [_run("none", lr, 0.3) for lr in LRS]
  paths = report.write_report(runs, {"metrics": {}}, tmp_path, dpi=40)
  text = paths["md"].read_text()
  assert "sgd: the best multiplier is x0.25, stable at 3/3 lrs" in text


def test_no_strategy_is_named_in_the_runner_the_analysis_or_the_report():
  """What the code does with a strategy comes from its attributes (baseline, swept, ...), so a
  strategy of one's own is run, compared and reported like the built-in ones."""
  import ast
  import pathlib

  from clipchain.study.strategies import STRATEGIES

  folder = pathlib.Path(report.__file__).parent
  for name in ("runner.py", "study.py", "analysis.py", "report.py", "plots.py", "metrics.py"):
    tree = ast.parse((folder / name).read_text())
    docstrings = {
      id(node.body[0].value)
      for node in ast.walk(tree)
      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef))
      and node.body
      and isinstance(node.body[0], ast.Expr)
      and isinstance(node.body[0].value, ast.Constant)
    }
    named = {
      node.value
      for node in ast.walk(tree)
      if isinstance(node, ast.Constant) and isinstance(node.value, str)
      and id(node) not in docstrings and node.value in STRATEGIES
    }  # fmt: skip
    assert not named, (name, named)

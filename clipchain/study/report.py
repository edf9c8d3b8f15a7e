"""The study report: what the analysis found, as one document rendered as Markdown and HTML.

It leads with the answer: per task, one table of what to use with each optimizer (the recommended
strategy and placement, its effect on the best loss and on the stable range with intervals over
seeds, its cost), the settings where training without clipping spiked or diverged and a strategy
did not, and the learning-rate sensitivity figure. The published orderings the study tests
(ZClip's) follow, then each task's details, then the definitions and what was run.

Runs of the threshold sweep (``sweep: true``) appear only in the sweep section; every other table
and plot reads the main runs alone, so each strategy has one threshold there. The numbers come from
:mod:`clipchain.study.analysis`, the figures from :mod:`clipchain.study.plots`, the two files from
:mod:`clipchain.study.render_markdown` and :mod:`clipchain.study.render_html`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from clipchain.study import plots as plotting
from clipchain.study import render_html, render_markdown
from clipchain.study.analysis import (
  SAME_LOSS_TOLERANCE,
  Row,
  StrategyInfo,
  check_ordering,
  fmt,
  instability,
  interval_text,
  placement_order,
  rank,
  rank_key,
  recommend,
  rescues,
  strategy_infos,
  summarize,
)
from clipchain.study.document import Document
from clipchain.study.record import RunRecord, as_records

_DASH = "—"


@dataclasses.dataclass
class _Study:
  runs: list[RunRecord]
  sweep: list[RunRecord]
  meta: dict
  infos: dict[str, StrategyInfo]
  plots: plotting.Plots
  curves: plotting.Curves
  colors: dict[str, Any]
  ranked: dict[tuple[str, str], list[Row]] = dataclasses.field(default_factory=dict)

  def rows(self, task: str, optimizer: str) -> list[Row]:
    """The ranked rows of a task and optimizer, computed once for every section that shows them
    (each row's intervals are a bootstrap over the seeds)."""
    if (task, optimizer) not in self.ranked:
      runs = [r for r in self.runs if r.task == task and r.optimizer == optimizer]
      self.ranked[(task, optimizer)] = rank(runs, self.infos)
    return self.ranked[(task, optimizer)]

  def color(self, strategy: str, slot: int = 0):
    return self.colors.get(strategy, "gray")

  def order(self, names) -> list[str]:
    names = set(names)
    return [n for n in self.infos if n in names] + sorted(names - set(self.infos))

  def is_baseline(self, name: str) -> bool:
    return self.infos.get(name, StrategyInfo(name)).baseline

  def tasks(self) -> list[str]:
    return sorted({r.task for r in self.runs + self.sweep})


def _optimizers(runs: Sequence[RunRecord]) -> list[str]:
  return sorted({r.optimizer for r in runs})


def _yes(flag: bool) -> str:
  return "yes" if flag else "no"


# ---------------------------------------------------------------------------------------------
# The answer


def _verdict_cells(rows: Sequence[Row]) -> list[str]:
  recommendation = recommend(rows)
  base = recommendation.baseline
  chosen = recommendation.recommended
  if recommendation.verdict == "helps" and chosen is not None:
    return [
      chosen.strategy,
      chosen.placement,
      interval_text(chosen.loss_change, percent=True),
      f"{chosen.stable_count} vs {base.stable_count}" if base else chosen.stable_count,
      interval_text(chosen.stable_gain),
      fmt(chosen.step_cost, 3),
      "helps",
    ]
  clipped = sorted((r for r in rows if not r.baseline), key=rank_key)
  top = clipped[0] if clipped else None
  verdict = {
    "indistinguishable": "indistinguishable from no clipping",
    "worse": "every strategy worse",
    "no baseline": "no baseline run",
    "only baseline": "only the baseline run",
  }[recommendation.verdict]
  detail = (
    f" (best ranked: {top.label}, {interval_text(top.loss_change, percent=True)})"
    if top is not None and base is not None
    else ""
  )
  return [
    "no clipping" if base is not None else _DASH,
    _DASH,
    _DASH,
    base.stable_count if base is not None else _DASH,
    _DASH,
    _DASH,
    verdict + detail,
  ]


def _answer(doc: Document, study: _Study) -> None:
  doc.heading(1, "clipchain study report")
  seeds = sorted({r.seed for r in study.runs})
  doc.para(
    "What to use, per task and optimizer. Each effect is the recommended strategy against no "
    f"clipping, paired by seed, with a 95% bootstrap interval over the {len(seeds)} seed(s): the "
    "best final loss (at each one's best stable learning rate, relative), and the number of "
    "learning rates at which no seed diverged. A strategy is recommended only when a difference is "
    f"resolved (its interval excludes zero; a loss change must also exceed "
    f"{SAME_LOSS_TOLERANCE:.0%}); otherwise the row says it is indistinguishable from no clipping. "
    "Definitions are at the end."
  )
  if not study.runs:
    doc.para("There are no runs to report.")
  for task in study.tasks():
    task_runs = [r for r in study.runs if r.task == task]
    if not task_runs:
      continue
    doc.heading(2, f"Task {task}")
    info = (study.meta.get("tasks") or {}).get(task) or {}
    if info.get("description"):
      doc.para(str(info["description"]))
    rows_by_opt = {opt: study.rows(task, opt) for opt in _optimizers(task_runs)}
    doc.table(
      [
        "optimizer",
        "use",
        "placement",
        "best loss vs none [95% CI]",
        "stable lrs (vs none)",
        "stable lrs gained [95% CI]",
        "cost (x none)",
        "verdict",
      ],
      [[opt, *_verdict_cells(rows)] for opt, rows in rows_by_opt.items()],
    )
    doc.para(f"Unstable without clipping? {instability(task_runs, study.infos)[1]}")
    _rescues(doc, study, task_runs)
    _lr_sensitivity(doc, study, task, task_runs)


def _rescues(doc: Document, study: _Study, task_runs: list[RunRecord]) -> None:
  found = rescues(task_runs, study.infos)
  if not found:
    doc.para(
      "No setting where training without clipping spiked or diverged was rescued: at no learning "
      "rate did a strategy avoid divergence in every seed and spike less."
    )
    return
  doc.para(
    "Where training without clipping spiked or diverged: at each such optimizer and learning rate, "
    "the strategies that diverged in no seed there and diverged in fewer seeds or spiked less, "
    "lowest final loss first (not diverging is not learning), with the paired change in spikes "
    "per run and its 95% interval over seeds."
  )
  groups: dict[tuple[str, float], list] = {}
  for rescue in found:
    groups.setdefault((rescue.optimizer, rescue.lr), []).append(rescue)
  rows = []
  for (opt, lr), items in groups.items():
    first = items[0]
    without = (
      f"diverged in {first.baseline_failed}/{first.seeds} seeds, "
      f"{first.baseline_spikes:.2g} spikes per run, final loss {fmt(first.baseline_final)}"
    )
    shown = "; ".join(
      f"{r.strategy} ({r.placement}): final loss {fmt(r.final)}, {r.spikes:.2g} spikes per run "
      f"({interval_text(r.spike_change)})"
      for r in items[:4]
    )
    more = f"; and {len(items) - 4} more (see the ranked tables)" if len(items) > 4 else ""
    rows.append([opt, f"{lr:g}", without, shown + more])
  doc.table(["optimizer", "lr", "without clipping", "with (change in spikes [95% CI])"], rows)


def _lr_sensitivity(doc: Document, study: _Study, task: str, task_runs: list[RunRecord]) -> None:
  doc.para(
    "Final loss against the learning rate (mean over the seeds that did not diverge; the band "
    "spans the seeds), one panel per optimizer and one line per strategy; an x at the top edge "
    "marks a learning rate at which a seed diverged. A good strategy has a flat, low line that "
    "reaches further right than no clipping's before its first x."
  )
  opts = _optimizers(task_runs)
  for placement in placement_order(r.placement for r in task_runs):
    runs_p = [r for r in task_runs if r.placement == placement]
    groups = []
    for opt in opts:
      runs_o = [r for r in runs_p if r.optimizer == opt]
      names = study.order(r.strategy for r in runs_o)
      groups.append((opt, [(s, [r for r in runs_o if r.strategy == s]) for s in names]))
    path = plotting.lr_figure(
      study.plots, groups, study.color, "strategy", (task, "lr-sensitivity", placement)
    )
    doc.image(path, f"Final loss against learning rate for task {task}, placement {placement}")


# ---------------------------------------------------------------------------------------------
# Published orderings


def _comparisons(doc: Document, study: _Study) -> None:
  comparisons = study.meta.get("published_orderings") or []
  checks = []
  for comparison in comparisons:
    for task in study.tasks():
      task_runs = [r for r in study.runs if r.task == task]
      for opt in _optimizers(task_runs):
        if opt in comparison.get("optimizers", ()):
          check = check_ordering(task_runs, comparison, opt)
          if check is not None:
            checks.append((task, check))
  if not checks:
    return
  doc.heading(2, "Published orderings, in miniature")
  for comparison in comparisons:
    mine = [(task, c) for task, c in checks if c.title == comparison["title"]]
    if not mine:
      continue
    doc.heading(3, comparison["title"])
    doc.para(
      f"The paper: {comparison['claim']} Here: at the learning rates where the last of "
      f"{' ≤ '.join(comparison['ordering'])} diverged in some seed or spiked, each strategy should "
      "have no more diverged runs and no more spikes per run than the next. The other strategies "
      "run are listed below the ordering's."
    )
    for task, check in mine:
      doc.para(f"Task {task}: {check.text}")
      doc.table(
        ["strategy", "diverged runs", "spikes per run", "final loss (runs that trained)"],
        [
          [name, f"{bad}/{n}", f"{spikes:.2g}", fmt(final)]
          for name, bad, n, spikes, final in check.table
        ],
      )


# ---------------------------------------------------------------------------------------------
# Each task's details


def _ranked_tables(doc: Document, study: _Study, task_runs: list[RunRecord]) -> None:
  doc.heading(3, "Ranked strategies")
  doc.para(
    "One table per optimizer, one row per strategy and placement, best first: ranked by the best "
    "final loss at a stable learning rate (lower is better), then by how many learning rates were "
    "stable. The effects against no clipping carry 95% bootstrap intervals over seeds; resolved "
    "says whether an interval excludes zero. Steps to target and eval loss are at the best "
    "learning rate; spikes, clipped fraction and skipped steps are means per run over every "
    "learning rate and seed; over-clipped counts runs; cost is time per step relative to no "
    "clipping."
  )
  header = [
    "rank",
    "strategy",
    "placement",
    "stable lrs",
    "stable range",
    "best final loss",
    "at lr",
    "vs none [95% CI]",
    "stable lrs gained [95% CI]",
    "resolved",
    "steps to target",
    "eval loss",
    "spikes / run",
    "clipped fraction",
    "over-clipped",
    "skipped steps",
    "cost (x none)",
  ]
  for opt in _optimizers(task_runs):
    rows = study.rows(task_runs[0].task, opt)
    doc.heading(4, f"Optimizer {opt}")
    doc.table(
      header,
      [
        [
          str(i + 1),
          row.strategy,
          row.placement,
          row.stable_count,
          row.stable_range,
          fmt(row.best_final),
          _DASH if row.best_lr is None else f"{row.best_lr:g}",
          _DASH if row.baseline else interval_text(row.loss_change, percent=True),
          _DASH if row.baseline else interval_text(row.stable_gain),
          _DASH if row.baseline else _yes(row.loss_change.resolved or row.stable_gain.resolved),
          fmt(row.steps_to_target, 6),
          fmt(row.eval_loss),
          fmt(row.spikes, 3),
          fmt(row.clipped_fraction, 3),
          f"{row.over_clipped}/{row.runs}",
          fmt(row.skipped_steps, 3),
          fmt(row.step_cost, 3),
        ]
        for i, row in enumerate(rows)
      ],
    )
    doc.para(recommend(rows).text)


def _heatmap(doc: Document, study: _Study, task: str, task_runs: list[RunRecord]) -> None:
  doc.heading(3, "Stability heat map")
  doc.para(
    "The share of runs (every learning rate and seed) that did not diverge, for each strategy "
    "(rows) and optimizer (columns); one panel per placement. 1 means every run trained, 0 that "
    "every run diverged; a dash means the combination was not run."
  )
  path = plotting.stability_figure(
    study.plots,
    task_runs,
    study.order(r.strategy for r in task_runs),
    _optimizers(task_runs),
    placement_order(r.placement for r in task_runs),
    (task, "stability"),
  )
  doc.image(path, f"Share of runs that did not diverge for task {task}, strategy by optimizer")


def _chosen_lr(study: _Study, runs: Sequence[RunRecord]) -> tuple[float, str]:
  """The lr the over-time plot shows, and why (see the section's caption)."""
  found = [r for r in rescues(runs, study.infos) if r.final is not None]
  chosen = recommend(rank(runs, study.infos)).recommended
  if chosen is not None:
    # The recommendation's own rescue, when it has one: the plot then shows why it was chosen.
    found = [
      r for r in found if (r.strategy, r.placement) == (chosen.strategy, chosen.placement)
    ] or found
  if found:
    # Where no clipping diverged first, then where it only spiked.
    best = min(found, key=lambda r: (r.baseline_failed == 0, r.final, -r.lr))
    what = "diverged" if best.baseline_failed else "spiked"
    return best.lr, (
      f"where no clipping {what} and {best.strategy} reached the lowest final loss of the "
      "strategies that did not diverge"
    )
  return max(r.lr for r in runs), "the highest lr (no lr separates no clipping from the others)"


def _over_time(doc: Document, study: _Study, task: str, task_runs: list[RunRecord]) -> None:
  doc.heading(3, "Loss and the norm the clip sees, over time")
  doc.para(
    "For one learning rate per optimizer: of those where no clipping diverged (else spiked), the "
    "one where a strategy that did not diverge reached the lowest final loss (else the highest), "
    "placement before when run. The "
    "left panel shows the training loss of each strategy's first seed (gaps are non-finite "
    "losses; a triangle marks each step where the spike rule says a spike starts); the right "
    "panel the norm the clip sees (solid) with its threshold (dashed) for the "
    "strategies with one global threshold, dots on the steps it clipped."
  )
  for opt in _optimizers(task_runs):
    runs_o = [r for r in task_runs if r.optimizer == opt]
    placement = placement_order(r.placement for r in runs_o)[0]
    runs_o = [r for r in runs_o if r.placement == placement]
    lr, why = _chosen_lr(study, runs_o)
    first: dict[str, RunRecord] = {}
    for r in sorted(runs_o, key=lambda r: r.seed):
      if r.lr == lr:
        first.setdefault(r.strategy, r)
    first = {s: first[s] for s in study.order(first)}
    norm_names = [s for s in first if study.infos.get(s, StrategyInfo(s)).global_threshold][:4]
    norm_names = norm_names or [s for s in first if not study.is_baseline(s)][:4] or list(first)[:1]
    seed = min(r.seed for r in first.values())
    path = plotting.over_time_figure(
      study.plots,
      study.curves,
      first,
      norm_names,
      study.color,
      f"{opt}, lr {lr:g}: loss (seed {seed})",
      (task, "over-time", opt),
    )
    doc.para(f"Optimizer {opt}, placement {placement}: lr {lr:g}, {why}.")
    doc.image(path, f"Loss and norm over time for task {task}, optimizer {opt}, lr {lr:g}")


def _shade_of(shade: Mapping[str, Any], label: str, slot: int) -> Any:
  return shade[label]


def _sweep(doc: Document, study: _Study, task: str) -> None:
  swept = [s for s, info in study.infos.items() if info.swept]
  runs = [
    r
    for r in study.runs + study.sweep
    if r.task == task
    and r.strategy in swept
    and r.placement == "before"
    and r.threshold.multiplier is not None
  ]
  doc.heading(3, "Threshold sweep")
  if not runs:
    doc.para("No swept strategy was run on this task with placement before.")
    return
  for name in study.order(r.strategy for r in runs):
    mine = [r for r in runs if r.strategy == name]
    multipliers = sorted({float(r.threshold.multiplier or 0.0) for r in mine})
    if len(multipliers) == 1:
      doc.para(f"{name}: only multiplier x{multipliers[0]:g} was run: the sweep was off.")
      continue
    doc.para(
      f"{name} (placement before) with its threshold scaled by each multiplier (x1 is the "
      "threshold used everywhere else in this report): final loss against the learning rate, one "
      "line per multiplier, an x at the top edge where a seed diverged. A threshold too small "
      "slows learning (the line rises); one too large stops protecting (x marks move left). The "
      f"best multiplier: among those whose best final loss is within {SAME_LOSS_TOLERANCE:.0%} of "
      "the lowest, the one stable at the most learning rates (ties: the smaller)."
    )
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    shade = {
      f"x{m:g}": cmap(0.85 * i / max(1, len(multipliers) - 1)) for i, m in enumerate(multipliers)
    }
    groups, sentences = [], []
    for opt in _optimizers(mine):
      runs_o = [r for r in mine if r.optimizer == opt]
      ms = sorted({float(r.threshold.multiplier or 0.0) for r in runs_o})
      lines = [(f"x{m:g}", [r for r in runs_o if r.threshold.multiplier == m]) for m in ms]
      groups.append((opt, lines))
      rows = [summarize(rs) for _, rs in lines]
      by_loss = sorted(range(len(ms)), key=lambda i: (rank_key(rows[i])[0], ms[i]))
      top = rows[by_loss[0]]
      close = [
        i
        for i in by_loss
        if top.best_final is not None
        and rows[i].best_final is not None
        and (rows[i].best_final or 0.0) - top.best_final
        <= SAME_LOSS_TOLERANCE * abs(top.best_final)
      ] or by_loss[:1]
      chosen = min(close, key=lambda i: (-rows[i].n_stable, ms[i]))
      best = rows[chosen]
      sentences.append(
        f"{opt}: the best multiplier is {lines[chosen][0]}, stable at {best.stable_count} lrs "
        f"({best.stable_range}) with best final loss {fmt(best.best_final)}."
      )
    path = plotting.lr_figure(
      study.plots,
      groups,
      functools.partial(_shade_of, shade),
      "multiplier",
      (task, "threshold-sweep", name),
    )
    doc.image(path, f"Threshold sweep of {name} for task {task}")
    doc.bullets(sentences)


def _before_after(doc: Document, study: _Study, task: str, task_runs: list[RunRecord]) -> None:
  doc.heading(3, "Before versus after the optimizer")
  pairs = []
  for opt in _optimizers(task_runs):
    rows = {(r.strategy, r.placement): r for r in study.rows(task, opt)}
    for s in study.order(k[0] for k in rows):
      if not study.is_baseline(s) and (s, "before") in rows and (s, "after") in rows:
        pairs.append((opt, s, rows[(s, "before")], rows[(s, "after")]))
  if not pairs:
    doc.para("No clipping strategy was run in both placements on this task.")
    return
  doc.para(
    "Each clipping strategy run in both placements: clipping the gradient before the optimizer "
    "against clipping the optimizer's update after it; stable learning rates (more is better) and "
    "best final loss (lower is better) side by side, each with its change against no clipping."
  )
  doc.table(
    [
      "optimizer",
      "strategy",
      "stable lrs before",
      "stable lrs after",
      "best final before (vs none)",
      "best final after (vs none)",
    ],
    [
      [
        opt,
        s,
        b.stable_count,
        a.stable_count,
        f"{fmt(b.best_final)} ({interval_text(b.loss_change, percent=True)})",
        f"{fmt(a.best_final)} ({interval_text(a.loss_change, percent=True)})",
      ]
      for opt, s, b, a in pairs
    ],
  )
  path = plotting.before_after_figure(study.plots, pairs, (task, "before-after"))
  doc.image(path, f"Before versus after the optimizer for task {task}")


def _cost(doc: Document, study: _Study, task_runs: list[RunRecord]) -> None:
  doc.heading(3, "Cost")
  doc.para(
    "Time per step of each strategy relative to no clipping with the same optimizer (1.00 means no "
    "overhead), and the steps per second behind it, measured in this same study on the same "
    "devices; a dash means no baseline was run. Each cell is timed once, compile excluded: "
    "differences of less than about 20% are within the noise of one timing (the benchmarks in "
    "benchmarks/ measure costs paired and repeated)."
  )
  opts = _optimizers(task_runs)
  header = ["strategy", "placement"]
  for opt in opts:
    header += [f"{opt} cost (x none)", f"{opt} steps/s"]
  rows = []
  for s in study.order(r.strategy for r in task_runs):
    for placement in placement_order(r.placement for r in task_runs if r.strategy == s):
      cells = [s, placement]
      for opt in opts:
        cell = [
          r for r in task_runs if (r.strategy, r.placement, r.optimizer) == (s, placement, opt)
        ]
        cost = [r.step_cost for r in cell if r.step_cost is not None]
        speed = [r.steps_per_second for r in cell if r.steps_per_second is not None]
        cells += [
          fmt(float(np.mean(cost)) if cost else None, 3),
          fmt(float(np.mean(speed)) if speed else None, 4),
        ]
      rows.append(cells)
  doc.table(header, rows)


def _details(doc: Document, study: _Study) -> None:
  for task in study.tasks():
    task_runs = [r for r in study.runs if r.task == task]
    doc.heading(2, f"Details: task {task}")
    info = (study.meta.get("tasks") or {}).get(task) or {}
    parts = []
    if info.get("steps") is not None:
      parts.append(f"Steps per run: {info['steps']}.")
    target = info.get("target_loss")
    parts.append(
      "Target loss: " + ("none (no steps to target)." if target is None else f"{target:g}.")
    )
    doc.para(" ".join(parts))
    if task_runs:
      _ranked_tables(doc, study, task_runs)
      _heatmap(doc, study, task, task_runs)
      _over_time(doc, study, task, task_runs)
    _sweep(doc, study, task)
    if task_runs:
      _before_after(doc, study, task, task_runs)
      _cost(doc, study, task_runs)


# ---------------------------------------------------------------------------------------------
# Definitions and what was run


def _definitions(doc: Document, study: _Study) -> None:
  m = study.meta.get("metrics") or {}
  doc.heading(2, "Definitions")
  doc.bullets(
    [
      f"Final loss: the mean training loss over the last "
      f"{float(m.get('final_fraction', 0.1)) * 100:g}% of steps.",
      "Diverged: the training loss became non-finite, or the final loss is above the initial loss "
      f"(the first batch's, before any update) by more than "
      f"{m.get('divergence_factor', 2.0) - 1:g} x the initial loss's magnitude (for a positive "
      "loss: above "
      f"{m.get('divergence_factor', 2.0):g} x the initial loss).",
      "Stable learning rate: one at which no seed diverged. Stable lrs k/n: k of the n learning "
      "rates tried were stable; the range gives the lowest..highest stable lr.",
      "Best final loss: over the stable learning rates, the lowest mean-over-seeds final loss.",
      f"Spike: a step whose loss rises above the median of the previous "
      f"{m.get('spike_window', 20)} steps by more than {m.get('spike_sigmas', 6.0):g} robust "
      "standard deviations of those steps (1.4826 x their median absolute deviation) and by more "
      f"than {m.get('spike_floor', 0.1):g} x the run's progress so far (initial minus lowest "
      f"loss before the step; at least {m.get('spike_min_scale', 1e-3):g} x the initial loss's "
      "magnitude); a non-finite loss "
      "after a finite window counts; consecutive spiking steps count once.",
      f"Over-clipped: the clip changed the update on at least "
      f"{m.get('overclip_fraction', 0.9):.0%} of steps, and the final loss is above the unclipped "
      f"run's (same learning rate and seed) by more than {m.get('overclip_margin', 0.1):g} x that "
      "run's progress (initial minus final loss).",
      f"Intervals: {95}% percentile bootstrap over seeds, paired by seed (same initial parameters "
      "and data), the statistic (the best learning rate included) recomputed on each of 2000 "
      "resamples. Resolved: the interval excludes zero.",
      f"Steps to target: the first step whose trailing {m.get('target_window', 10)}-step mean loss "
      "is at or below the task's target; the median over seeds at the best learning rate.",
      "Clipped fraction: the share of steps on which the clip changed the update. Skipped steps: "
      "steps a guard skipped. Cost: time per step relative to no clipping with the same task and "
      "optimizer, in this same study.",
    ]
  )
  doc.heading(3, "Strategies")
  doc.table(
    ["strategy", "rule"],
    [[name, info.rule or _DASH] for name, info in study.infos.items()],
  )


def _what_was_run(doc: Document, study: _Study) -> None:
  meta = study.meta
  all_runs = study.runs + study.sweep
  doc.heading(2, "What was run")
  versions = ", ".join(
    f"{k} {meta[k]}" for k in ("clipchain", "jax", "optax", "flax") if meta.get(k) is not None
  )
  seconds = meta.get("seconds")
  finite = isinstance(seconds, (int, float)) and math.isfinite(seconds)
  seconds_text = f"{seconds:.0f}" if finite else _DASH
  doc.bullets(
    [
      f"Runs: {len(all_runs)} ({len(study.runs)} main runs, {len(study.sweep)} extra runs of the "
      "threshold sweep).",
      f"Tasks: {', '.join(study.tasks()) or _DASH}.",
      f"Strategies: {', '.join(study.order(r.strategy for r in all_runs)) or _DASH}.",
      f"Optimizers: {', '.join(_optimizers(all_runs)) or _DASH}.",
      f"Placements: {', '.join(placement_order(r.placement for r in all_runs)) or _DASH}.",
      f"Seeds per learning rate: {len({r.seed for r in all_runs})}.",
      f"Started: {meta.get('started', _DASH)}; took {seconds_text} s.",
      f"Devices: {', '.join(map(str, meta.get('devices') or [])) or _DASH} "
      f"(processes: {meta.get('process_count', _DASH)}).",
      f"Versions: {versions or _DASH}.",
    ]
  )
  args = meta.get("args") or {}
  if args:
    doc.para("The arguments of the study:")
    doc.table(
      ["argument", "given"],
      [[k, json.dumps(v, sort_keys=True, default=str)] for k, v in sorted(args.items())],
    )


def build(runs, meta: Mapping, out_dir: pathlib.Path, *, dpi: int = plotting.DPI) -> Document:
  """The report's document; its figures are written under ``out_dir / "plots"``."""
  records = as_records(runs)
  meta = dict(meta or {})
  infos = strategy_infos(meta, {r.strategy for r in records})
  study = _Study(
    runs=[r for r in records if not r.sweep],
    sweep=[r for r in records if r.sweep],
    meta=meta,
    infos=infos,
    plots=plotting.Plots(out_dir, dpi),
    curves=plotting.Curves(out_dir),
    colors=plotting.colors(infos),
  )
  doc = Document()
  _answer(doc, study)
  _comparisons(doc, study)
  _details(doc, study)
  _definitions(doc, study)
  _what_was_run(doc, study)
  return doc


def write_report(
  runs, meta: Mapping, out_dir: pathlib.Path, *, dpi: int = plotting.DPI
) -> dict[str, pathlib.Path]:
  """Writes ``report.md``, ``report.html`` and the plots under ``plots/`` into ``out_dir``.

  Args:
    runs: The runs (:class:`~clipchain.study.record.RunRecord` s, or the dicts of
      ``results.json``), threshold-sweep runs included.
    meta: The ``meta`` object of ``results.json``.
    out_dir: The study's output directory; curve files are read relative to it.
    dpi: Resolution of the plots.

  Returns:
    ``{"md": path, "html": path}``.
  """
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  doc = build(runs, meta, out_dir, dpi=dpi)
  paths = {"md": out_dir / "report.md", "html": out_dir / "report.html"}
  paths["md"].write_text(render_markdown.render(doc, out_dir), encoding="utf-8")
  paths["html"].write_text(render_html.render(doc, "clipchain study report"), encoding="utf-8")
  return paths


def summary_table(runs, meta: Mapping | None = None) -> str:
  """A short plain-text table for the terminal: per task and optimizer, what to use.

  Args:
    runs: The runs of ``results.json`` (records or dicts); threshold-sweep runs are left out.
    meta: ``results.json``'s meta, for the strategies' descriptions (optional).

  Returns:
    The table, lines joined by newlines.

  Examples:
    >>> runs = [
    ...   dict(task="t", strategy=s, placement="before", optimizer="sgd", lr=lr, seed=seed,
    ...        final_loss=1.0, diverged=(s == "none" and lr > 0.1))
    ...   for s in ("none", "global") for lr in (0.1, 1.0) for seed in range(3)
    ... ]
    >>> print(summary_table(runs))
    task / optimizer   use               stable lrs   best loss vs none   verdict
    t / sgd            global (before)   2/2 vs 1/2   +0% [+0%, +0%]      helps
  """
  records = [r for r in as_records(runs) if not r.sweep]
  infos = strategy_infos(meta or {}, {r.strategy for r in records})
  table = []
  for task in sorted({r.task for r in records}):
    for opt in sorted({r.optimizer for r in records if r.task == task}):
      rows = rank([r for r in records if r.task == task and r.optimizer == opt], infos)
      recommendation = recommend(rows)
      chosen, base = recommendation.recommended, recommendation.baseline
      if recommendation.verdict == "helps" and chosen is not None and base is not None:
        use, stable = chosen.label, f"{chosen.stable_count} vs {base.stable_count}"
        change = interval_text(chosen.loss_change, percent=True)
      else:
        use, stable, change = "no clipping", base.stable_count if base else _DASH, _DASH
      table.append((f"{task} / {opt}", use, stable, change, recommendation.verdict))
  header = ("task / optimizer", "use", "stable lrs", "best loss vs none", "verdict")
  widths = [max(len(row[i]) for row in [header, *table]) for i in range(4)]
  lines = [
    "   ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "   " + row[4]
    for row in [header, *table]
  ]
  return "\n".join(lines)

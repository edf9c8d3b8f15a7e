"""The study report: tables, plots and recommendations from ``results.json``, as Markdown and HTML.

Everything shown is computed once into a list of blocks (headings, paragraphs, tables, images) and
then rendered twice, so ``report.md`` and ``report.html`` cannot disagree. The plots are PNG files
under ``plots/``; the HTML embeds them as data URIs, so it is one file that can be mailed or
attached to an issue.

Runs of the fixed-global-clip threshold sweep (``sweep: true``) appear only in the sweep section;
every other table and plot reads the main runs alone, so each strategy has one threshold there.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import pathlib
import re
import zipfile
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

#: Strategies in the order plots and the heat map list them; names not here follow, sorted.
KNOWN_STRATEGIES = (
  "none",
  "value",
  "global",
  "layer",
  "unit",
  "autoclip",
  "zclip",
  "quantile",
  "adagc",
  "spam",
  "global+skip",
)
#: Strategies whose norm and threshold the over-time plot shows, when they were run.
NORM_PLOT_STRATEGIES = ("global", "zclip", "autoclip", "quantile")
#: A best final loss within this relative distance of the unclipped one counts as no difference.
SAME_LOSS_TOLERANCE = 0.05
PLACEMENTS = ("before", "after")
_DASH = "—"
_DPI = 100


# ---------------------------------------------------------------------------------------------
# Numbers


def _finite(value: Any) -> float | None:
  if value is None:
    return None
  value = float(value)
  return value if math.isfinite(value) else None


def _diverged(run: dict) -> bool:
  # A run without a finite final loss has nothing to rank it by, whatever its flag says.
  return bool(run.get("diverged")) or _finite(run.get("final_loss")) is None


def _mean(values: Iterable[Any]) -> float | None:
  values = [v for v in (_finite(v) for v in values) if v is not None]
  return sum(values) / len(values) if values else None


def _relative(value: float | None, base: float | None) -> float | None:
  """``(value - base) / |base|``: positive when ``value`` is the larger (worse) loss."""
  if value is None or base is None:
    return None
  if base == 0:
    return 0.0 if value == 0 else math.copysign(math.inf, value)
  return (value - base) / abs(base)


def _lr_text(lr: float | None) -> str:
  return _DASH if lr is None else f"{lr:g}"


def _num(value: float | None, digits: int = 4) -> str:
  return _DASH if value is None else f"{value:.{digits}g}"


def _percent(rel: float) -> str:
  return f"{rel * 100:+.0f}%" if math.isfinite(rel) else ("+inf%" if rel > 0 else "-inf%")


def _multiplier(run: dict) -> float | None:
  value = _finite((run.get("threshold") or {}).get("multiplier"))
  # The main global run may leave its multiplier out; it is the sweep's reference point, x1.
  return 1.0 if value is None and not run.get("sweep") else value


def _strategy_order(names: Iterable[str]) -> list[str]:
  names = set(names)
  known = [s for s in KNOWN_STRATEGIES if s in names]
  return known + sorted(names - set(known))


def _placement_order(names: Iterable[str]) -> list[str]:
  names = set(names)
  return [p for p in PLACEMENTS if p in names] + sorted(names - set(PLACEMENTS))


@dataclasses.dataclass(frozen=True)
class Row:
  """What one strategy achieved in one placement, over every lr and seed of a task and optimizer.

  Attributes:
    strategy: The strategy's name.
    placement: ``"before"`` or ``"after"`` the optimizer.
    lrs: Every learning rate run, ascending.
    stable_lrs: The learning rates at which no seed diverged, ascending.
    best_lr: The stable lr with the lowest mean final loss; None when no lr is stable.
    best_final: That mean final loss (mean over seeds).
    steps_to_target: Median over seeds at ``best_lr``, not reaching the target counting as never;
      None when the median run does not reach it.
    eval_loss: Mean over seeds at ``best_lr``; None when the task has no eval loss.
    spikes: Mean loss-spike count per run, over every lr and seed.
    clipped_fraction: Mean share of clipped steps per run, over every lr and seed.
    skipped_steps: Mean skipped steps per run, over every lr and seed.
    step_cost: Time per step relative to ``none`` in the same task, optimizer and placement.
    steps_per_second: Mean steps per second of the cell.
    runs: How many runs the row holds.
    stable_runs: How many of them did not diverge.
    finals: The mean final loss (over seeds) at each stable learning rate.
  """

  strategy: str
  placement: str
  lrs: tuple[float, ...]
  stable_lrs: tuple[float, ...]
  best_lr: float | None
  best_final: float | None
  steps_to_target: float | None
  eval_loss: float | None
  spikes: float | None
  clipped_fraction: float | None
  skipped_steps: float | None
  step_cost: float | None
  steps_per_second: float | None
  runs: int
  stable_runs: int
  finals: dict = dataclasses.field(default_factory=dict)

  @property
  def n_stable(self) -> int:
    return len(self.stable_lrs)

  @property
  def stable_count(self) -> str:
    """``"k/n"``: stable learning rates out of those run."""
    return f"{self.n_stable}/{len(self.lrs)}"

  @property
  def stable_range(self) -> str:
    """``"lo..hi"`` over the stable lrs, ``"none"`` when there is none, marked when it has gaps."""
    if not self.stable_lrs:
      return "none"
    lo, hi = self.stable_lrs[0], self.stable_lrs[-1]
    text = _lr_text(lo) if lo == hi else f"{_lr_text(lo)}..{_lr_text(hi)}"
    inside = [lr for lr in self.lrs if lo <= lr <= hi]
    return text if len(inside) == self.n_stable else text + " (with gaps)"

  @property
  def label(self) -> str:
    return f"{self.strategy} ({self.placement})"


def rank_key(row: Row) -> tuple:
  """The lowest best final loss first, then the most stable learning rates, then name, placement.

  A strategy that never diverges but never learns (a threshold so tight the model barely moves) is
  stable everywhere; ranking by loss first keeps it from looking best.
  """
  best = math.inf if row.best_final is None else row.best_final
  # On a tie, before ranks first: it is the usual place to clip, so it is the one to recommend.
  placement = PLACEMENTS.index(row.placement) if row.placement in PLACEMENTS else len(PLACEMENTS)
  return (best, -row.n_stable, row.strategy, placement, row.placement)


def _pick(rows: Sequence[Row]) -> Row:
  """Among the rows within 5 % of the lowest best final loss, the one stable at the most lrs."""
  top = rows[0]
  close = [
    r for r in rows if (_relative(r.best_final, top.best_final) or 0.0) <= SAME_LOSS_TOLERANCE
  ]
  return min(close, key=lambda r: (-r.n_stable, rank_key(r)))


def summarize(runs: Sequence[dict]) -> Row:
  """The :class:`Row` of the runs of one strategy and placement (one task and optimizer)."""
  by_lr: dict[float, list[dict]] = {}
  for run in runs:
    by_lr.setdefault(float(run["lr"]), []).append(run)
  lrs = tuple(sorted(by_lr))
  stable = tuple(lr for lr in lrs if not any(_diverged(r) for r in by_lr[lr]))
  finals = {lr: _mean(r.get("final_loss") for r in by_lr[lr]) for lr in stable}
  finals = {lr: v for lr, v in finals.items() if v is not None}
  best_lr = min(finals, key=lambda lr: (finals[lr], lr)) if finals else None
  steps = eval_loss = None
  if best_lr is not None:
    at_best = by_lr[best_lr]
    reached = [_finite(r.get("steps_to_target")) for r in at_best]
    median = float(np.median([math.inf if s is None else s for s in reached]))
    steps = median if math.isfinite(median) else None
    eval_loss = _mean(r.get("eval_loss") for r in at_best)
  return Row(
    strategy=runs[0]["strategy"],
    placement=runs[0]["placement"],
    lrs=lrs,
    stable_lrs=stable,
    best_lr=best_lr,
    best_final=None if best_lr is None else finals.get(best_lr),
    steps_to_target=steps,
    eval_loss=eval_loss,
    spikes=_mean(r.get("spike_count") for r in runs),
    clipped_fraction=_mean(r.get("clipped_fraction") for r in runs),
    skipped_steps=_mean(r.get("skipped_steps") for r in runs),
    step_cost=_mean(r.get("step_cost") for r in runs),
    steps_per_second=_mean(r.get("steps_per_second") for r in runs),
    runs=len(runs),
    stable_runs=sum(not _diverged(r) for r in runs),
    finals=finals,
  )


def rank(runs: Sequence[dict]) -> list[Row]:
  """One :class:`Row` per strategy and placement of ``runs`` (one task and optimizer), ranked."""
  groups: dict[tuple[str, str], list[dict]] = {}
  for run in runs:
    groups.setdefault((run["strategy"], run["placement"]), []).append(run)
  return sorted((summarize(g) for g in groups.values()), key=rank_key)


@dataclasses.dataclass(frozen=True)
class Recommendation:
  """The verdict for one task and optimizer (see :func:`recommend` for the rule).

  Attributes:
    verdict: ``"helps"``, ``"no difference"``, ``"worse"``, ``"no baseline"`` or ``"only none"``.
    recommended: The recommended row; None when clipping did not help.
    worse: The clipped rows that did worse than ``none``, each with its reason.
    text: The sentences the report prints.
  """

  verdict: str
  recommended: Row | None
  worse: tuple[tuple[Row, str], ...]
  text: str


def _stable_text(row: Row) -> str:
  return f"{row.stable_count} lrs" + (f" ({row.stable_range})" if row.stable_lrs else "")


def recommend(rows: Sequence[Row]) -> Recommendation:
  """Recommends a strategy for one task and optimizer from its ranked rows, by a fixed rule.

  The baseline is ``none`` (placement ``before`` when both were run). Among the clipped rows whose
  best final loss is within 5 % of the lowest, the one stable at the most learning rates is the
  candidate. It *helps* when its best final loss is more than 5 % below the baseline's, or within
  5 % of it while stable at more learning rates (or at any, where the baseline is stable at none);
  it is then recommended, with how far it widens the stable range. A row is *worse* when its best
  final loss is more than 5 % higher than the baseline's, or when it is stable at fewer learning
  rates. When the candidate does not help and no row is worse, clipping made no difference. Worse
  rows are always listed.

  Args:
    rows: The :class:`Row` s of one task and optimizer, both placements.

  Returns:
    The :class:`Recommendation`.
  """
  baselines = sorted(
    (r for r in rows if r.strategy == "none"), key=lambda r: r.placement != "before"
  )
  clipped = sorted((r for r in rows if r.strategy != "none"), key=rank_key)
  if not clipped:
    return Recommendation("only none", None, (), "Only the unclipped baseline was run.")
  top = _pick(clipped)
  if not baselines:
    return Recommendation(
      "no baseline",
      top,
      (),
      f"No unclipped baseline was run, so nothing can be said about whether clipping helps; "
      f"the top-ranked strategy is {top.label}, stable at {top.stable_count} lrs.",
    )
  base = baselines[0]

  def helps(row: Row) -> bool:
    if row.best_final is None:
      return False
    if base.best_final is None:
      return True  # the baseline diverged at every lr; this row trains at some
    rel = _relative(row.best_final, base.best_final)
    if rel is not None and rel < -SAME_LOSS_TOLERANCE:
      return True
    return rel is not None and rel <= SAME_LOSS_TOLERANCE and row.n_stable > base.n_stable

  worse = []
  for row in clipped:
    reasons = []
    if row.n_stable < base.n_stable:
      reasons.append(f"stable at {row.stable_count} lrs vs {base.stable_count} without clipping")
    rel = _relative(row.best_final, base.best_final)
    if rel is not None and rel > SAME_LOSS_TOLERANCE:
      reasons.append(
        f"best final loss {_num(row.best_final)} vs {_num(base.best_final)} ({_percent(rel)})"
      )
    if reasons:
      worse.append((row, " and ".join(reasons)))
  worse_text = (
    " Clipping made things worse with: "
    + "; ".join(f"{row.label}: {why}" for row, why in worse)
    + "."
    if worse
    else ""
  )
  base_text = f"none is stable at {_stable_text(base)}, best final loss {_num(base.best_final)}."
  if not helps(top):
    verdict = "worse" if len(worse) == len(clipped) else "no difference"
    if base.n_stable == 0 and all(r.n_stable == 0 for r in clipped):
      lead = (
        "Clipping made no difference: every run diverged at every lr, with or without clipping."
      )
    elif not worse:
      lead = (
        "Clipping made no difference: no strategy has a best final loss more than 5% below "
        "none's, or as good a loss at more stable lrs."
      )
    else:
      lead = (
        "No strategy improved on none: none has a best final loss more than 5% lower, or as good a "
        "loss at more stable lrs."
      )
    return Recommendation(verdict, None, tuple(worse), f"{lead} {base_text}{worse_text}")
  gained = top.n_stable - base.n_stable
  if gained > 0:
    widen = f"it widens the stable range by {gained} lr{'s' if gained != 1 else ''} over none"
    if top.stable_lrs and base.stable_lrs and top.stable_lrs[-1] != base.stable_lrs[-1]:
      ratio = top.stable_lrs[-1] / base.stable_lrs[-1]
      widen += f", highest stable lr {_lr_text(top.stable_lrs[-1])} ({ratio:.3g}x none's)"
    # Not diverging is not learning: say what the extra learning rates reached.
    extra = [lr for lr in top.stable_lrs if lr not in base.stable_lrs]
    widen += (
      " (final loss "
      + ", ".join(f"{_num(top.finals.get(lr))} at lr {_lr_text(lr)}" for lr in extra)
      + ")"
    )
  elif gained < 0:
    widen = (
      f"it lowers the best final loss by more than 5% but is stable at {-gained} "
      f"lr{'s' if gained != -1 else ''} fewer than none"
    )
  else:
    widen = "it does not widen the stable range, but lowers the best final loss by more than 5%"
  rel = _relative(top.best_final, base.best_final)
  change = f" ({_percent(rel)} vs none)" if rel is not None else ""
  # The rule always names one strategy; saying which others it barely beat keeps that honest.
  ties = [
    r.strategy
    for r in clipped
    if r is not top
    and r.n_stable == top.n_stable
    and r.strategy != top.strategy
    and (_relative(r.best_final, top.best_final) or 0.0) <= SAME_LOSS_TOLERANCE
  ]
  ties_text = (
    f" As good by this rule (as many stable lrs, best final loss within 5%): "
    f"{', '.join(dict.fromkeys(ties))}."
    if ties
    else ""
  )
  text = (
    f"Recommended: {top.label}, stable at {_stable_text(top)}, best final "
    f"loss {_num(top.best_final)}{change}; {widen}.{ties_text} Without clipping, "
    f"{base_text}{worse_text}"
  )
  return Recommendation("helps", top, tuple(worse), text)


def instability(runs: Sequence[dict]) -> tuple[bool | None, str]:
  """Whether a task really explodes without clipping: ``none`` diverged at some lr in every seed.

  Args:
    runs: The main runs of one task.

  Returns:
    ``(verdict, sentence)``; the verdict is None when ``none`` was not run.
  """
  base = [r for r in runs if r["strategy"] == "none"]
  if not base:
    return None, "Not known: the unclipped baseline none was not run on this task."
  seeds = sorted({r["seed"] for r in base})
  exploded = sorted({r["seed"] for r in base if _diverged(r)})
  per_optimizer = []
  for opt in sorted({r["optimizer"] for r in base}):
    runs_opt = [r for r in base if r["optimizer"] == opt]
    div = [
      lr
      for lr in sorted({r["lr"] for r in runs_opt})
      if any(_diverged(r) for r in runs_opt if r["lr"] == lr)
    ]
    per_optimizer.append(
      f"{opt}: diverged at lr {', '.join(_lr_text(lr) for lr in div)}"
      if div
      else f"{opt}: never diverged"
    )
  detail = f" ({'; '.join(per_optimizer)})."
  if len(exploded) == len(seeds):
    return True, f"Yes: without clipping every seed ({len(seeds)}) diverged at some lr{detail}"
  return False, (
    f"No: without clipping only {len(exploded)} of {len(seeds)} seeds diverged at any lr, so this "
    f"task did not reliably explode{detail}"
  )


def summary_table(runs: Sequence[dict]) -> str:
  """A short plain-text table for the terminal: placement ``before``, per task and optimizer.

  Each strategy's stable learning rates (k/n) and best final loss, best first; ``*`` marks the
  recommended strategy (see :func:`recommend`).

  Args:
    runs: The records of ``results.json``; threshold-sweep runs are left out.

  Returns:
    The table, lines joined by newlines.

  Examples:
    >>> runs = [
    ...   dict(task="t", strategy=s, placement="before", optimizer="sgd", lr=lr, seed=0,
    ...        final_loss=1.0, diverged=(s == "none" and lr > 0.1))
    ...   for s in ("none", "global") for lr in (0.1, 1.0)
    ... ]
    >>> print(summary_table(runs))
    task / optimizer   strategy   stable lrs   best final
    t / sgd
                     * global     2/2          1
                       none       1/2          1
  """
  main = [r for r in runs if not r.get("sweep")]
  lines = [f"{'task / optimizer':<18} {'strategy':<14} {'stable lrs':<12} best final"]
  for task in sorted({r["task"] for r in main}):
    for opt in sorted({r["optimizer"] for r in main if r["task"] == task}):
      cell = [r for r in main if r["task"] == task and r["optimizer"] == opt]
      rows = rank(cell)
      chosen = recommend(rows).recommended
      lines.append(f"{task} / {opt}")
      shown = [r for r in rows if r.placement == "before"]
      for row in shown:
        mark = "*" if row == chosen else " "
        lines.append(
          f"{'':<16} {mark} {row.strategy:<12} {row.stable_count:<12} {_num(row.best_final)}"
        )
      if not shown:
        lines.append(f"{'':<18} (no runs with placement before)")
      if chosen is not None and chosen not in shown:
        lines.append(f"{'':<18} recommended: {chosen.label}")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Documents: computed once, rendered as Markdown and as HTML


@dataclasses.dataclass
class _Doc:
  blocks: list[tuple] = dataclasses.field(default_factory=list)

  def heading(self, level: int, text: str) -> None:
    self.blocks.append(("heading", level, text))

  def para(self, text: str) -> None:
    self.blocks.append(("para", text))

  def bullets(self, items: Sequence[str]) -> None:
    self.blocks.append(("bullets", tuple(items)))

  def table(self, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    self.blocks.append(("table", tuple(header), tuple(tuple(r) for r in rows)))

  def image(self, path: pathlib.Path, alt: str) -> None:
    self.blocks.append(("image", path, alt))


_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|#])")


def _md(text: str) -> str:
  return _MD_SPECIAL.sub(r"\\\1", str(text))


def _render_md(doc: _Doc, out_dir: pathlib.Path) -> str:
  out = []
  for block in doc.blocks:
    kind = block[0]
    if kind == "heading":
      out.append(f"{'#' * block[1]} {_md(block[2])}")
    elif kind == "para":
      out.append(_md(block[1]))
    elif kind == "bullets":
      out.append("\n".join(f"- {_md(item)}" for item in block[1]))
    elif kind == "table":
      header, rows = block[1], block[2]
      lines = ["| " + " | ".join(_md(h) for h in header) + " |", "|" + "---|" * len(header)]
      lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
      out.append("\n".join(lines))
    elif kind == "image":
      out.append(f"![{_md(block[2])}]({block[1].relative_to(out_dir).as_posix()})")
  return "\n\n".join(out) + "\n"


_CSS = """
body { font-family: sans-serif; max-width: 72rem; margin: 1rem auto; padding: 0 1rem;
       line-height: 1.45; color: #222; }
h1, h2, h3, h4 { line-height: 1.2; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .2rem; margin-top: 2.5rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .9rem; }
th, td { border: 1px solid #ccc; padding: .2rem .5rem; text-align: left; }
th { background: #f3f3f3; }
tbody tr:nth-child(even) { background: #fafafa; }
img { max-width: 100%; height: auto; display: block; margin: .5rem 0 1rem; }
"""


def _render_html(doc: _Doc, title: str) -> str:
  esc = html.escape
  out = [
    "<!DOCTYPE html>",
    '<html lang="en">',
    "<head>",
    '<meta charset="utf-8">',
    '<meta name="viewport" content="width=device-width, initial-scale=1">',
    f"<title>{esc(title)}</title>",
    f"<style>{_CSS}</style>",
    "</head>",
    "<body>",
  ]
  for block in doc.blocks:
    kind = block[0]
    if kind == "heading":
      out.append(f"<h{block[1]}>{esc(block[2])}</h{block[1]}>")
    elif kind == "para":
      out.append(f"<p>{esc(block[1])}</p>")
    elif kind == "bullets":
      out.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in block[1]) + "</ul>")
    elif kind == "table":
      head = "".join(f"<th>{esc(h)}</th>" for h in block[1])
      body = "".join(
        "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in block[2]
      )
      out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    elif kind == "image":
      data = base64.b64encode(block[1].read_bytes()).decode("ascii")
      out.append(f'<img src="data:image/png;base64,{data}" alt="{esc(block[2])}">')
  out += ["</body>", "</html>"]
  return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# Plots


class _Plots:
  """Saves figures under ``plots/`` with unique, stable names and byte-stable PNGs."""

  def __init__(self, out_dir: pathlib.Path, dpi: int):
    self.dir = out_dir / "plots"
    self.dpi = dpi
    self.used: set[str] = set()

  def figure(self, width: float, height: float):
    # A bare Figure renders with Agg on savefig and never reaches pyplot's registry, so there is
    # no global backend to set, no window, and nothing left open to close.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=self.dpi, layout="constrained")

  def save(self, fig, *parts: str) -> pathlib.Path:
    stem = "-".join(re.sub(r"[^A-Za-z0-9.+-]+", "_", p).strip("_") or "x" for p in parts)
    name, n = stem, 1
    while name in self.used:
      n += 1
      name = f"{stem}-{n}"
    self.used.add(name)
    self.dir.mkdir(parents=True, exist_ok=True)
    path = self.dir / f"{name}.png"
    fig.savefig(path, format="png", dpi=self.dpi, metadata={"Software": None})
    return path


def _colors(strategies: Iterable[str]) -> dict[str, Any]:
  from matplotlib import colormaps

  # tab20's dark shades first, then its light ones: 20 distinct colours before any repeat.
  palette = colormaps["tab20"]
  order = [i for i in range(0, 20, 2)] + [i for i in range(1, 20, 2)]
  names = [s for s in _strategy_order(strategies) if s != "none"]
  colors: dict[str, Any] = {s: palette(order[i % 20]) for i, s in enumerate(names)}
  colors["none"] = "black"
  return colors


def _set_log_if_sensible(ax, axis: str, values: Iterable[float], span: float = 1.0) -> None:
  """Log scale when every finite value is positive and they span more than ``span`` decades."""
  vals = np.asarray([v for v in values if v is not None], np.float64)
  vals = vals[np.isfinite(vals)]
  if vals.size and np.all(vals > 0) and np.log10(vals.max() / vals.min()) > span:
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


def _mark_diverged(ax, lrs: Sequence[float], color, slot: int) -> None:
  # Diverged runs have no loss to plot: an 'x' at the top edge (staggered per line so markers of
  # different lines do not hide each other) says the lr was tried and failed.
  if lrs:
    y = 0.97 - 0.025 * (slot % 10)
    ax.plot(lrs, [y] * len(lrs), "x", color=color, transform=ax.get_xaxis_transform(), ms=7)


def _no_data(ax, text: str = "no data") -> None:
  ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def _lr_curve(runs: Sequence[dict]) -> tuple[list[float], list[float], list[float]]:
  """(lrs, mean final loss of the seeds that did not diverge, lrs where any seed diverged)."""
  lrs = sorted({float(r["lr"]) for r in runs})
  xs, ys, bad = [], [], []
  for lr in lrs:
    at = [r for r in runs if float(r["lr"]) == lr]
    mean = _mean(r.get("final_loss") for r in at if not _diverged(r))
    if mean is not None:
      xs.append(lr)
      ys.append(mean)
    if any(_diverged(r) for r in at):
      bad.append(lr)
  return xs, ys, bad


def _lr_figure(
  plots: _Plots,
  groups: Sequence[tuple[str, Sequence[tuple[str, Sequence[dict]]]]],
  colors: Callable[[str, int], Any],
  legend_title: str,
  name: Sequence[str],
):
  """Final loss against lr: one panel per ``(title, [(label, runs), ...])`` group."""
  fig = plots.figure(4.2 * len(groups) + 1.6, 3.4)
  axes = fig.subplots(1, len(groups), squeeze=False)[0]
  handles: dict[str, Any] = {}
  for ax, (title, lines) in zip(axes, groups):
    all_x = [float(r["lr"]) for _, runs in lines for r in runs]
    all_y = []
    for slot, (label, runs) in enumerate(lines):
      xs, ys, bad = _lr_curve(runs)
      color = colors(label, slot)
      (h,) = ax.plot(xs, ys, "o-", color=color, ms=4, lw=1.3, label=label)
      handles.setdefault(label, h)
      _mark_diverged(ax, bad, color, slot)
      all_y += ys
    _set_log_if_sensible(ax, "x", all_x, span=0.0)
    _set_log_if_sensible(ax, "y", all_y)
    if all_x:
      # The learning rates tried, labelled as given: log axes' own minor labels overlap here.
      from matplotlib.ticker import NullLocator

      tried = sorted(set(all_x))
      ax.set_xticks(tried, [f"{lr:g}" for lr in tried])
      ax.xaxis.set_minor_locator(NullLocator())
    if not all_y:
      _no_data(ax, "every run diverged")
    ax.set_title(title)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final loss (mean over seeds)")
    ax.grid(alpha=0.3)
  if handles:
    fig.legend(list(handles.values()), list(handles), loc="outside right upper", title=legend_title)
  return plots.save(fig, *name)


class _Curves:
  """Reads per-step curves from the cells' ``.npz`` files, each file once."""

  def __init__(self, out_dir: pathlib.Path):
    self.out_dir = out_dir
    self.cache: dict[str, dict[str, np.ndarray] | None] = {}

  def get(self, run: dict) -> dict[str, np.ndarray] | None:
    ref = run.get("curves") or {}
    file, index = ref.get("file"), ref.get("index")
    if file is None or index is None:
      return None
    if file not in self.cache:
      try:
        with np.load(self.out_dir / file) as data:
          self.cache[file] = {k: np.asarray(data[k]) for k in data.files}
      except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        self.cache[file] = None
    data = self.cache[file]
    if data is None or "loss" not in data or not 0 <= int(index) < len(data["loss"]):
      return None
    return {k: v[int(index)] for k, v in data.items() if v.ndim == 2}


def _finite_or_nan(values: np.ndarray) -> np.ndarray:
  values = np.asarray(values, np.float64)
  return np.where(np.isfinite(values), values, np.nan)


# ---------------------------------------------------------------------------------------------
# Sections


@dataclasses.dataclass
class _Study:
  runs: list[dict]
  sweep: list[dict]
  meta: dict
  plots: _Plots
  curves: _Curves
  colors: dict[str, Any]

  def color(self, strategy: str, slot: int = 0):
    return self.colors.get(strategy, "gray")


def _header(doc: _Doc, study: _Study, all_runs: Sequence[dict]) -> None:
  meta = study.meta
  runs = study.runs
  doc.heading(1, "clipchain study report")
  versions = ", ".join(
    f"{k} {meta[k]}" for k in ("clipchain", "jax", "optax", "flax") if meta.get(k) is not None
  )
  seconds = _finite(meta.get("seconds"))
  doc.heading(2, "What was run")
  doc.bullets(
    [
      f"Runs: {len(all_runs)} ({len(runs)} main runs, {len(study.sweep)} extra runs of the "
      f"fixed-global-clip threshold sweep).",
      f"Tasks: {', '.join(sorted({r['task'] for r in all_runs})) or _DASH}.",
      f"Strategies: {', '.join(_strategy_order(r['strategy'] for r in all_runs)) or _DASH}.",
      f"Optimizers: {', '.join(sorted({r['optimizer'] for r in all_runs})) or _DASH}.",
      f"Placements: {', '.join(_placement_order(r['placement'] for r in all_runs)) or _DASH}.",
      f"Seeds per learning rate: {len({r['seed'] for r in all_runs})} "
      f"({', '.join(str(s) for s in sorted({r['seed'] for r in all_runs})) or _DASH}).",
      f"Started: {meta.get('started', _DASH)}; took "
      f"{_DASH if seconds is None else f'{seconds:.0f}'} s.",
      f"Devices: {', '.join(map(str, meta.get('devices') or [])) or _DASH} "
      f"(processes: {meta.get('process_count', _DASH)}).",
      f"Versions: {versions or _DASH}.",
    ]
  )
  args = meta.get("args") or {}
  if args:
    doc.para("The arguments of the study command:")
    doc.table(
      ["argument", "value"],
      [[k, json.dumps(v, sort_keys=True, default=str)] for k, v in sorted(args.items())],
    )
  doc.heading(2, "How to read this report")
  doc.para(
    "Every strategy was trained on every task with every optimizer over a grid of learning rates "
    "and several seeds. A learning rate counts as stable for a strategy when no seed diverged at "
    "it; a clipping strategy is useful when it keeps training stable at learning rates where the "
    "unclipped baseline none diverges, without making the loss worse where none is stable. The "
    "recommendations come first; then each task has a ranked table per optimizer, a learning-rate "
    "sensitivity plot, a stability heat map, loss and gradient-norm curves, the threshold sweep of "
    "the fixed global clip, a before-versus-after-the-optimizer comparison, and the cost per step. "
    "Placement before clips the gradient before the optimizer sees it; after clips the update the "
    "optimizer produces."
  )
  metrics = meta.get("metrics") or {}
  frac = metrics.get("final_fraction", 0.1)
  factor = metrics.get("divergence_factor", 2.0)
  window = metrics.get("target_window", 10)
  spike_w = metrics.get("spike_window", 20)
  spike_f = metrics.get("spike_factor", 2.0)
  doc.heading(2, "Metric definitions")
  doc.bullets(
    [
      f"Final loss: the mean training loss over the last {float(frac) * 100:g}% of steps.",
      f"Diverged: the training loss became non-finite, or the final loss is above {factor:g} x "
      f"the initial loss (the loss of the first batch, before any update).",
      "Stable learning rate: one at which no seed diverged. Stable lrs k/n: k of the n learning "
      "rates tried were stable; the range gives the lowest..highest stable lr.",
      "Best final loss: over the stable learning rates, the lowest mean-over-seeds final loss.",
      f"Steps to target: the first step whose trailing {window}-step mean loss is at or below the "
      f"task's target loss; the median over seeds at the best learning rate.",
      f"Spike: a step whose loss is above {spike_f:g} x the median of the previous {spike_w} "
      f"steps; consecutive spiking steps count once.",
      "Clipped fraction: the share of steps on which the clip changed the update. Skipped steps: "
      "steps a guard skipped.",
      "Cost: time per step relative to none with the same task, optimizer and placement, measured "
      "in this same study run.",
    ]
  )


def _recommendations(doc: _Doc, study: _Study) -> None:
  doc.heading(2, "Recommendations")
  doc.para(
    "The rule, applied per task and optimizer with both placements as candidates: the baseline is "
    "none. Among the clipping strategies whose best final loss (at their best stable learning "
    f"rate) is within {SAME_LOSS_TOLERANCE:.0%} of the lowest, the one stable at the most learning "
    f"rates is the candidate. It helps when its best final loss is more than "
    f"{SAME_LOSS_TOLERANCE:.0%} below none's, or as good while stable at more learning rates; it "
    "is then recommended, with how much it widens the stable range over none. A strategy is worse "
    f"when its best final loss is more than {SAME_LOSS_TOLERANCE:.0%} above none's, or when it is "
    "stable at fewer learning rates. A strategy stable everywhere that does not learn is worse, "
    "not better. When none helps and none is worse, clipping made no difference. "
    "Strategies that did worse are always listed. Each task also says whether it really became "
    "unstable without clipping: that none diverged at some learning rate in every seed."
  )
  if not study.runs:
    doc.para("There are no runs to recommend from.")
  for task in sorted({r["task"] for r in study.runs}):
    task_runs = [r for r in study.runs if r["task"] == task]
    doc.heading(3, f"Task {task}")
    items = [f"Unstable without clipping? {instability(task_runs)[1]}"]
    for opt in sorted({r["optimizer"] for r in task_runs}):
      rows = rank([r for r in task_runs if r["optimizer"] == opt])
      items.append(f"{opt}: {recommend(rows).text}")
    doc.bullets(items)


def _task_intro(doc: _Doc, study: _Study, task: str) -> None:
  info = (study.meta.get("tasks") or {}).get(task) or {}
  doc.heading(2, f"Task {task}")
  parts = []
  if info.get("description"):
    parts.append(str(info["description"]))
  if info.get("steps") is not None:
    parts.append(f"Steps per run: {info['steps']}.")
  target = _finite(info.get("target_loss"))
  parts.append(
    "Target loss: " + ("none (no steps to target)." if target is None else f"{target:g}.")
  )
  doc.para(" ".join(parts))


def _ranked_tables(doc: _Doc, study: _Study, task_runs: list[dict]) -> None:
  doc.heading(3, "1. Ranked strategies")
  doc.para(
    "One table per optimizer, one row per strategy and placement, best first: ranked by the best "
    "final loss at a stable learning rate (lower is better), then by how many learning rates were "
    "stable (more is better). "
    "The stable range is the lowest..highest stable lr (marked when an unstable lr lies inside "
    "it, and none when every lr diverged in some seed). Steps to target and eval loss are at the "
    "best learning rate; spikes, clipped fraction and skipped steps are means per run over every "
    "learning rate and seed; cost is time per step relative to none. A dash means no value: no "
    "stable lr, target not reached, or not measured."
  )
  header = [
    "rank",
    "strategy",
    "placement",
    "stable lrs",
    "stable range",
    "best final loss",
    "at lr",
    "steps to target",
    "eval loss",
    "spikes / run",
    "clipped fraction",
    "skipped steps",
    "cost (x none)",
  ]
  for opt in sorted({r["optimizer"] for r in task_runs}):
    rows = rank([r for r in task_runs if r["optimizer"] == opt])
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
          _num(row.best_final),
          _lr_text(row.best_lr),
          _num(row.steps_to_target, 6),
          _num(row.eval_loss),
          _num(row.spikes, 3),
          _num(row.clipped_fraction, 3),
          _num(row.skipped_steps, 3),
          _num(row.step_cost, 3),
        ]
        for i, row in enumerate(rows)
      ],
    )


def _lr_sensitivity(doc: _Doc, study: _Study, task: str, task_runs: list[dict]) -> None:
  doc.heading(3, "2. Learning-rate sensitivity")
  doc.para(
    "Final loss (mean over the seeds that did not diverge) against the learning rate, one panel "
    "per optimizer and one line per strategy. An x at the top edge marks a learning rate at which "
    "at least one seed of that strategy diverged. A good strategy has a flat, low line that "
    "reaches further to the right than none's before its first x."
  )
  opts = sorted({r["optimizer"] for r in task_runs})
  for placement in _placement_order(r["placement"] for r in task_runs):
    runs_p = [r for r in task_runs if r["placement"] == placement]
    groups = []
    for opt in opts:
      runs_o = [r for r in runs_p if r["optimizer"] == opt]
      names = _strategy_order(r["strategy"] for r in runs_o)
      groups.append((opt, [(s, [r for r in runs_o if r["strategy"] == s]) for s in names]))
    path = _lr_figure(
      study.plots, groups, study.color, "strategy", (task, "lr-sensitivity", placement)
    )
    doc.image(path, f"Final loss against learning rate for task {task}, placement {placement}")


def _heatmap(doc: _Doc, study: _Study, task: str, task_runs: list[dict]) -> None:
  doc.heading(3, "3. Stability heat map")
  doc.para(
    "The share of runs (every learning rate and seed) that did not diverge, for each strategy "
    "(rows) and optimizer (columns); one panel per placement. 1 means every run trained, 0 that "
    "every run diverged; a dash means the combination was not run."
  )
  placements = _placement_order(r["placement"] for r in task_runs)
  strategies = _strategy_order(r["strategy"] for r in task_runs)
  opts = sorted({r["optimizer"] for r in task_runs})
  fig = study.plots.figure(
    max(3.0, 1.1 * len(opts) + 1.8) * len(placements) + 1.0, 0.35 * len(strategies) + 1.6
  )
  axes = fig.subplots(1, len(placements), squeeze=False)[0]
  image = None
  for ax, placement in zip(axes, placements):
    grid = np.full((len(strategies), len(opts)), np.nan)
    for i, s in enumerate(strategies):
      for j, opt in enumerate(opts):
        cell = [
          r
          for r in task_runs
          if (r["strategy"], r["optimizer"], r["placement"]) == (s, opt, placement)
        ]
        if cell:
          grid[i, j] = sum(not _diverged(r) for r in cell) / len(cell)
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
      text = _DASH if np.isnan(v) else f"{v:.2f}"
      # RdYlGn is dark at both ends: white text there stays readable.
      dark = not np.isnan(v) and (v > 0.8 or v < 0.15)
      ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(len(opts)), opts)
    ax.set_yticks(range(len(strategies)), strategies)
    ax.set_title(f"placement {placement}")
  fig.colorbar(image, ax=list(axes), label="share of runs that did not diverge", shrink=0.8)
  path = study.plots.save(fig, task, "stability")
  doc.image(path, f"Share of runs that did not diverge for task {task}, strategy by optimizer")


def _chosen_lr(runs: Sequence[dict]) -> tuple[float, str]:
  """The lr the over-time plot shows, and why (see the section's caption)."""
  lrs = sorted({float(r["lr"]) for r in runs}, reverse=True)
  for lr in lrs:
    at = [r for r in runs if float(r["lr"]) == lr]
    base_failed = any(_diverged(r) for r in at if r["strategy"] == "none")
    others = {r["strategy"] for r in at if r["strategy"] != "none"}
    saved = [s for s in others if not any(_diverged(r) for r in at if r["strategy"] == s)]
    if base_failed and saved:
      return lr, "the highest lr at which none diverged and another strategy did not"
  return lrs[0], "the highest lr (no lr separates none from the clipping strategies)"


def _over_time(doc: _Doc, study: _Study, task: str, task_runs: list[dict]) -> None:
  doc.heading(3, "4. Loss and gradient norm over time")
  doc.para(
    "For one learning rate per optimizer: the highest at which none diverged in at least one seed "
    "while some other strategy did not in any (else the highest learning rate), placement before "
    "when run. The left panel shows the training loss of each strategy's first seed (gaps are "
    "non-finite losses); the right panel shows the gradient norm the clip sees (solid) with its "
    "threshold (dashed) for a few adaptive and fixed clips, with dots on the steps it clipped. A "
    "clip that works keeps the loss going down where none's blows up, and clips only the spikes."
  )
  for opt in sorted({r["optimizer"] for r in task_runs}):
    runs_o = [r for r in task_runs if r["optimizer"] == opt]
    placement = _placement_order(r["placement"] for r in runs_o)[0]
    runs_o = [r for r in runs_o if r["placement"] == placement]
    lr, why = _chosen_lr(runs_o)
    first: dict[str, dict] = {}
    for r in sorted(runs_o, key=lambda r: r["seed"]):
      if float(r["lr"]) == lr:
        first.setdefault(r["strategy"], r)
    names = _strategy_order(first)
    norm_names = [s for s in NORM_PLOT_STRATEGIES if s in first]
    norm_names = norm_names or [s for s in names if s != "none"][:4] or names[:1]
    fig = study.plots.figure(11.0, 3.6)
    ax_loss, ax_norm = fig.subplots(1, 2)
    loss_values, norm_values, handles = [], [], {}
    for s in names:
      curves = study.curves.get(first[s])
      if curves is None:
        continue
      loss = _finite_or_nan(curves["loss"])
      (h,) = ax_loss.plot(loss, color=study.color(s), lw=1.0, label=s)
      handles[s] = h
      loss_values += loss[np.isfinite(loss)].tolist()
      if s in norm_names and "norm" in curves:
        norm = _finite_or_nan(curves["norm"])
        ax_norm.plot(norm, color=study.color(s), lw=0.9, label=s)
        norm_values += norm[np.isfinite(norm)].tolist()
        if "threshold" in curves:
          thr = _finite_or_nan(curves["threshold"])
          if np.isfinite(thr).any():
            ax_norm.plot(thr, "--", color=study.color(s), lw=1.0)
            norm_values += thr[np.isfinite(thr)].tolist()
        if "clipped" in curves:
          steps = np.flatnonzero(np.asarray(curves["clipped"], bool) & np.isfinite(norm))
          ax_norm.plot(steps, norm[steps], ".", color=study.color(s), ms=3)
    _set_log_if_sensible(ax_loss, "y", loss_values, span=0.0)
    _set_log_if_sensible(ax_norm, "y", norm_values)
    for ax, values in ((ax_loss, loss_values), (ax_norm, norm_values)):
      if not values:
        _no_data(ax, "no finite values" if handles else "no curves found")
      ax.set_xlabel("step")
      ax.grid(alpha=0.3)
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title(f"{opt}, lr {lr:g}: loss (seed {min(r['seed'] for r in first.values())})")
    ax_norm.set_ylabel("gradient norm (solid), threshold (dashed)")
    ax_norm.set_title(f"gradient norm: {', '.join(norm_names)}")
    if handles:
      fig.legend(list(handles.values()), list(handles), loc="outside right upper", title="strategy")
    path = study.plots.save(fig, task, "over-time", opt)
    doc.para(f"Optimizer {opt}, placement {placement}: lr {lr:g}, {why}.")
    doc.image(path, f"Loss and gradient norm over time for task {task}, optimizer {opt}, lr {lr:g}")


def _sweep(doc: _Doc, study: _Study, task: str) -> None:
  doc.heading(3, "5. Threshold sweep of the fixed global clip")
  runs = [
    r
    for r in study.runs + study.sweep
    if r["task"] == task
    and r["strategy"] == "global"
    and r["placement"] == "before"
    and _multiplier(r) is not None
  ]
  if not runs:
    doc.para("The fixed global clip was not run on this task with placement before.")
    return
  doc.para(
    "The fixed global-norm clip (placement before) with its threshold scaled by each multiplier "
    "(x1 is the threshold used everywhere else in this report): final loss against the learning "
    "rate, one line per multiplier, an x at the top edge where a seed diverged. A threshold that "
    "is too small slows learning (the line rises); one too large stops protecting (x marks move "
    "left). The best multiplier is chosen by the rule of the recommendations: among those whose "
    f"best final loss is within {SAME_LOSS_TOLERANCE:.0%} of the lowest, the one stable at the "
    "most learning rates (ties: the smaller multiplier)."
  )
  opts = sorted({r["optimizer"] for r in runs})
  from matplotlib import colormaps

  # Every run here has a multiplier (the filter above): None never reaches the sort.
  multipliers = sorted({float(_multiplier(r) or 0.0) for r in runs})
  if len(multipliers) == 1:
    doc.para(f"Only multiplier x{multipliers[0]:g} was run: the sweep was off in this study.")
    return
  cmap = colormaps["viridis"]
  shade = {
    f"x{m:g}": cmap(0.85 * i / max(1, len(multipliers) - 1)) for i, m in enumerate(multipliers)
  }
  groups, sentences = [], []
  for opt in opts:
    runs_o = [r for r in runs if r["optimizer"] == opt]
    ms = sorted({float(_multiplier(r) or 0.0) for r in runs_o})
    lines = [(f"x{m:g}", [r for r in runs_o if _multiplier(r) == m]) for m in ms]
    groups.append((opt, lines))
    rows = [summarize(rs) for _, rs in lines]
    by_loss = sorted(range(len(ms)), key=lambda i: (rank_key(rows[i])[0], ms[i]))
    top = rows[by_loss[0]]
    close = [
      i
      for i in by_loss
      if (_relative(rows[i].best_final, top.best_final) or 0.0) <= SAME_LOSS_TOLERANCE
    ]
    # Ties go to the smaller multiplier: the tighter clip that did as well.
    chosen = min(close, key=lambda i: (-rows[i].n_stable, ms[i]))
    label, best = lines[chosen][0], rows[chosen]
    if len(ms) == 1:
      sentences.append(f"{opt}: only multiplier {label} was run.")
    else:
      sentences.append(
        f"{opt}: the best multiplier is {label}, stable at {best.stable_count} lrs "
        f"({best.stable_range}) with best final loss {_num(best.best_final)}."
      )

  path = _lr_figure(
    study.plots, groups, lambda label, _: shade[label], "multiplier", (task, "threshold-sweep")
  )
  doc.image(path, f"Threshold sweep of the fixed global clip for task {task}")
  doc.bullets(sentences)


def _before_after(doc: _Doc, study: _Study, task: str, task_runs: list[dict]) -> None:
  doc.heading(3, "6. Before versus after the optimizer")
  pairs = []
  for opt in sorted({r["optimizer"] for r in task_runs}):
    rows = {
      (r.strategy, r.placement): r for r in rank([r for r in task_runs if r["optimizer"] == opt])
    }
    for s in _strategy_order(k[0] for k in rows):
      if s != "none" and (s, "before") in rows and (s, "after") in rows:
        pairs.append((opt, s, rows[(s, "before")], rows[(s, "after")]))
  if not pairs:
    doc.para("No clipping strategy was run in both placements on this task.")
    return
  doc.para(
    "Each clipping strategy run in both placements: clipping the gradient before the optimizer "
    "against clipping the optimizer's update after it. The table and the bars give the stable "
    "learning rates (more is better) and the best final loss (lower is better) side by side; a "
    "missing bar means no learning rate was stable."
  )
  doc.table(
    [
      "optimizer",
      "strategy",
      "stable lrs before",
      "stable lrs after",
      "best final before",
      "best final after",
    ],
    [
      [opt, s, b.stable_count, a.stable_count, _num(b.best_final), _num(a.best_final)]
      for opt, s, b, a in pairs
    ],
  )
  opts = sorted({p[0] for p in pairs})
  fig = study.plots.figure(max(4.0, 0.6 * len(pairs) / len(opts) + 2.5) * len(opts), 5.6)
  axes = fig.subplots(2, len(opts), squeeze=False)
  for j, opt in enumerate(opts):
    mine = [p for p in pairs if p[0] == opt]
    x = np.arange(len(mine))
    for i, (metric, label) in enumerate(
      ((lambda r: r.n_stable, "stable lrs"), (lambda r: r.best_final, "best final loss"))
    ):
      ax = axes[i, j]
      finals = []
      for k, placement in enumerate(("before", "after")):
        vals = [metric(p[2 + k]) for p in mine]
        finals += [v for v in vals if v is not None]
        heights = [np.nan if v is None else v for v in vals]
        ax.bar(
          x + (k - 0.5) * 0.4,
          heights,
          width=0.4,
          label=placement,
          color=("tab:blue", "tab:orange")[k],
        )
      ax.set_xticks(x, [p[1] for p in mine], rotation=45, ha="right")
      ax.set_ylabel(label)
      if i == 1:
        _set_log_if_sensible(ax, "y", finals)
        if not finals:
          _no_data(ax, "no stable lr")
      else:
        ax.set_title(opt)
      ax.grid(alpha=0.3, axis="y")
  axes[0, 0].legend(title="placement")
  path = study.plots.save(fig, task, "before-after")
  doc.image(path, f"Before versus after the optimizer for task {task}")


def _cost(doc: _Doc, study: _Study, task: str, task_runs: list[dict]) -> None:
  doc.heading(3, "7. Cost")
  doc.para(
    "Time per step of each strategy relative to none with the same optimizer and placement (1.00 "
    "means no overhead; 1.20 means 20% slower), and the steps per second behind it. Both were "
    "measured in this same study run on the same devices, so they compare strategies with each "
    "other, not with other machines; a dash means none was not run to compare against. Each cell "
    "is timed once, compile excluded, while the machine may be doing other work: differences of "
    "less than about 20% are within the noise of one timing (the benchmarks in benchmarks/ "
    "measure costs paired and repeated)."
  )
  opts = sorted({r["optimizer"] for r in task_runs})
  header = ["strategy", "placement"]
  for opt in opts:
    header += [f"{opt} cost (x none)", f"{opt} steps/s"]
  rows = []
  for s in _strategy_order(r["strategy"] for r in task_runs):
    for placement in _placement_order(r["placement"] for r in task_runs if r["strategy"] == s):
      cells = [s, placement]
      for opt in opts:
        cell = [
          r
          for r in task_runs
          if (r["strategy"], r["placement"], r["optimizer"]) == (s, placement, opt)
        ]
        cells += [
          _num(_mean(r.get("step_cost") for r in cell), 3),
          _num(_mean(r.get("steps_per_second") for r in cell), 4),
        ]
      rows.append(cells)
  doc.table(header, rows)


def write_report(
  runs: list[dict], meta: dict, out_dir: pathlib.Path, *, dpi: int = _DPI
) -> dict[str, pathlib.Path]:
  """Writes ``report.md``, ``report.html`` and the plots under ``plots/`` into ``out_dir``.

  Args:
    runs: The records of ``results.json`` (threshold-sweep runs included; they are shown only in
      the sweep section).
    meta: The ``meta`` object of ``results.json``.
    out_dir: The study's output directory; curve files are read relative to it.
    dpi: Resolution of the plots.

  Returns:
    ``{"md": path, "html": path}``.
  """
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  all_runs = list(runs)
  study = _Study(
    runs=[r for r in all_runs if not r.get("sweep")],
    sweep=[r for r in all_runs if r.get("sweep")],
    meta=meta or {},
    plots=_Plots(out_dir, dpi),
    curves=_Curves(out_dir),
    colors=_colors(r["strategy"] for r in all_runs),
  )
  doc = _Doc()
  _header(doc, study, all_runs)
  _recommendations(doc, study)
  for task in sorted({r["task"] for r in all_runs}):
    task_runs = [r for r in study.runs if r["task"] == task]
    _task_intro(doc, study, task)
    if task_runs:
      _ranked_tables(doc, study, task_runs)
      _lr_sensitivity(doc, study, task, task_runs)
      _heatmap(doc, study, task, task_runs)
      _over_time(doc, study, task, task_runs)
    _sweep(doc, study, task)
    if task_runs:
      _before_after(doc, study, task, task_runs)
      _cost(doc, study, task, task_runs)
  paths = {"md": out_dir / "report.md", "html": out_dir / "report.html"}
  paths["md"].write_text(_render_md(doc, out_dir), encoding="utf-8")
  paths["html"].write_text(_render_html(doc, "clipchain study report"), encoding="utf-8")
  return paths

"""The report's figures, as PNG files under ``plots/``: byte-stable, uniquely named, no pyplot."""

from __future__ import annotations

import pathlib
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from clipchain.study.analysis import Row, StrategyInfo, failed
from clipchain.study.metrics import spike_steps
from clipchain.study.record import RunRecord

DPI = 100


class Plots:
  """Saves figures under ``plots/`` with unique, stable names and byte-stable PNGs."""

  def __init__(self, out_dir: pathlib.Path, dpi: int = DPI):
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


class Curves:
  """Reads per-step curves from the cells' ``.npz`` files, each file once."""

  def __init__(self, out_dir: pathlib.Path):
    self.out_dir = out_dir
    self.cache: dict[str, dict[str, np.ndarray] | None] = {}

  def get(self, run: RunRecord) -> dict[str, np.ndarray] | None:
    if run.curves is None:
      return None
    file, index = run.curves.file, run.curves.index
    if file not in self.cache:
      try:
        with np.load(self.out_dir / file) as data:
          self.cache[file] = {k: np.asarray(data[k]) for k in data.files}
      except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        self.cache[file] = None
    data = self.cache[file]
    if data is None or "loss" not in data or not 0 <= index < len(data["loss"]):
      return None
    return {k: v[index] for k, v in data.items() if v.ndim == 2}


def colors(infos: Mapping[str, StrategyInfo]) -> dict[str, Any]:
  """A colour per strategy: black for the baseline, tab20's dark then light shades for the rest."""
  from matplotlib import colormaps

  palette = colormaps["tab20"]
  order = [i for i in range(0, 20, 2)] + [i for i in range(1, 20, 2)]
  names = [s for s, info in infos.items() if not info.baseline]
  chosen: dict[str, Any] = {s: palette(order[i % 20]) for i, s in enumerate(names)}
  chosen.update({s: "black" for s, info in infos.items() if info.baseline})
  return chosen


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


def _lr_curve(runs: Sequence[RunRecord]):
  """(lrs, mean final loss of the seeds that did not diverge, its min and max over those seeds,
  lrs where any seed diverged)."""
  lrs = sorted({r.lr for r in runs})
  xs, ys, lo, hi, bad = [], [], [], [], []
  for lr in lrs:
    at = [r for r in runs if r.lr == lr]
    finals = [r.final_loss for r in at if not failed(r) and r.final_loss is not None]
    if finals:
      xs.append(lr)
      ys.append(float(np.mean(finals)))
      lo.append(min(finals))
      hi.append(max(finals))
    if any(failed(r) for r in at):
      bad.append(lr)
  return xs, ys, lo, hi, bad


def lr_figure(
  plots: Plots,
  groups: Sequence[tuple[str, Sequence[tuple[str, Sequence[RunRecord]]]]],
  color: Callable[[str, int], Any],
  legend_title: str,
  name: Sequence[str],
) -> pathlib.Path:
  """Final loss against lr: one panel per ``(title, [(label, runs), ...])`` group; a band from the
  lowest to the highest seed."""
  fig = plots.figure(4.2 * len(groups) + 1.6, 3.4)
  axes = fig.subplots(1, len(groups), squeeze=False)[0]
  handles: dict[str, Any] = {}
  for ax, (title, lines) in zip(axes, groups):
    all_x = [r.lr for _, runs in lines for r in runs]
    all_y: list[float] = []
    for slot, (label, runs) in enumerate(lines):
      xs, ys, lo, hi, bad = _lr_curve(runs)
      c = color(label, slot)
      (h,) = ax.plot(xs, ys, "o-", color=c, ms=4, lw=1.3, label=label)
      if len(xs) > 1:
        ax.fill_between(xs, lo, hi, color=c, alpha=0.12, lw=0)
      handles.setdefault(label, h)
      _mark_diverged(ax, bad, c, slot)
      all_y += ys + lo + hi
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
    ax.set_ylabel("final loss (mean; band: seeds)")
    ax.grid(alpha=0.3)
  if handles:
    fig.legend(list(handles.values()), list(handles), loc="outside right upper", title=legend_title)
  return plots.save(fig, *name)


def stability_figure(
  plots: Plots,
  runs: Sequence[RunRecord],
  strategies: Sequence[str],
  optimizers: Sequence[str],
  placements: Sequence[str],
  name: Sequence[str],
) -> pathlib.Path:
  """The share of runs that did not diverge, strategy (rows) by optimizer (columns), per
  placement."""
  fig = plots.figure(
    max(3.0, 1.1 * len(optimizers) + 1.8) * len(placements) + 1.0, 0.35 * len(strategies) + 1.6
  )
  axes = fig.subplots(1, len(placements), squeeze=False)[0]
  image = None
  for ax, placement in zip(axes, placements):
    grid = np.full((len(strategies), len(optimizers)), np.nan)
    for i, s in enumerate(strategies):
      for j, opt in enumerate(optimizers):
        cell = [r for r in runs if (r.strategy, r.optimizer, r.placement) == (s, opt, placement)]
        if cell:
          grid[i, j] = sum(not failed(r) for r in cell) / len(cell)
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
      text = "—" if np.isnan(v) else f"{v:.2f}"
      # RdYlGn is dark at both ends: white text there stays readable.
      dark = not np.isnan(v) and (v > 0.8 or v < 0.15)
      ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(len(optimizers)), optimizers)
    ax.set_yticks(range(len(strategies)), strategies)
    ax.set_title(f"placement {placement}")
  fig.colorbar(image, ax=list(axes), label="share of runs that did not diverge", shrink=0.8)
  return plots.save(fig, *name)


def _finite_or_nan(values: np.ndarray) -> np.ndarray:
  values = np.asarray(values, np.float64)
  return np.where(np.isfinite(values), values, np.nan)


def over_time_figure(
  plots: Plots,
  curves: Curves,
  first: Mapping[str, RunRecord],
  norm_names: Sequence[str],
  color: Callable[[str], Any],
  title: str,
  name: Sequence[str],
) -> pathlib.Path:
  """The training loss of each strategy's run (left, a triangle where a spike starts), and the
  norm the clip sees with its threshold and the clipped steps for ``norm_names`` (right)."""
  fig = plots.figure(11.0, 3.6)
  ax_loss, ax_norm = fig.subplots(1, 2)
  loss_values: list[float] = []
  norm_values: list[float] = []
  initial: list[float] = []
  handles: dict[str, Any] = {}
  for s, run in first.items():
    data = curves.get(run)
    if data is None:
      continue
    loss = _finite_or_nan(data["loss"])
    initial.append(loss[0])
    (h,) = ax_loss.plot(loss, color=color(s), lw=1.0, label=s)
    # Where the spike rule fired, so that it can be checked against the curve by eye.
    spiking = spike_steps(data["loss"])
    onsets = np.flatnonzero(spiking & ~np.concatenate([[False], spiking[:-1]]) & np.isfinite(loss))
    ax_loss.plot(onsets, loss[onsets], "v", color=color(s), ms=5, mec="black", mew=0.4)
    handles[s] = h
    loss_values += loss[np.isfinite(loss)].tolist()
    if s in norm_names and "norm" in data:
      norm = _finite_or_nan(data["norm"])
      ax_norm.plot(norm, color=color(s), lw=0.9, label=s)
      norm_values += norm[np.isfinite(norm)].tolist()
      if "threshold" in data:
        thr = _finite_or_nan(data["threshold"])
        if np.isfinite(thr).any():
          ax_norm.plot(thr, "--", color=color(s), lw=1.0)
          norm_values += thr[np.isfinite(thr)].tolist()
      if "clipped" in data:
        steps = np.flatnonzero(np.asarray(data["clipped"], bool) & np.isfinite(norm))
        ax_norm.plot(steps, norm[steps], ".", color=color(s), ms=3)
  _set_log_if_sensible(ax_loss, "y", loss_values, span=0.0)
  starts = [float(v) for v in initial if np.isfinite(v)]
  if starts and loss_values and max(loss_values) > 10 * max(abs(v) for v in starts):
    # A diverging run's loss grows by tens of orders of magnitude and would flatten the others:
    # the axis stops at ten times the largest initial loss (the run leaves the panel there).
    bottom, _ = ax_loss.get_ylim()
    ax_loss.set_ylim(bottom, 10 * max(abs(v) for v in starts))
  _set_log_if_sensible(ax_norm, "y", norm_values)
  for ax, values in ((ax_loss, loss_values), (ax_norm, norm_values)):
    if not values:
      _no_data(ax, "no finite values" if handles else "no curves found")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  ax_loss.set_ylabel("training loss")
  ax_loss.set_title(title)
  ax_norm.set_ylabel("norm the clip sees (solid), threshold (dashed)")
  ax_norm.set_title(f"norm: {', '.join(norm_names)}")
  if handles:
    fig.legend(list(handles.values()), list(handles), loc="outside right upper", title="strategy")
  return plots.save(fig, *name)


def before_after_figure(
  plots: Plots, pairs: Sequence[tuple[str, str, Row, Row]], name: Sequence[str]
) -> pathlib.Path:
  """Bars of stable lrs and best final loss, before against after, per optimizer."""
  opts = sorted({p[0] for p in pairs})
  fig = plots.figure(max(4.0, 0.6 * len(pairs) / len(opts) + 2.5) * len(opts), 5.6)
  axes = fig.subplots(2, len(opts), squeeze=False)
  for j, opt in enumerate(opts):
    mine = [p for p in pairs if p[0] == opt]
    x = np.arange(len(mine))
    metrics: tuple[tuple[Callable[[Row], float | None], str], ...] = (
      (lambda r: r.n_stable, "stable lrs"),
      (lambda r: r.best_final, "best final loss"),
    )
    for i, (metric, label) in enumerate(metrics):
      ax = axes[i, j]
      finals = []
      for k, placement in enumerate(("before", "after")):
        vals = [metric(p[2] if k == 0 else p[3]) for p in mine]
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
  return plots.save(fig, *name)

"""What a study found, from its run records: rankings, effects with confidence intervals, verdicts.

Nothing here renders: the report (``report.py``), the terminal summary and the tests read these
objects. Every comparison of a strategy with the unclipped baseline is paired by seed (a seed fixes
the initial parameters and the data, so both saw the same batches) and comes with a percentile
bootstrap interval over seeds: the seeds are resampled with replacement, the whole statistic (the
best learning rate included) recomputed on each resample. A difference is *resolved* when its
interval excludes zero.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from clipchain.study.metrics import finite_or_none
from clipchain.study.record import RunRecord

#: A best final loss within this relative distance of the baseline's counts as no difference, even
#: when resolved: a clip that changes the loss by less is not worth recommending for it.
SAME_LOSS_TOLERANCE = 0.05
#: Bootstrap resamples of the seeds, and the interval's coverage.
BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95
PLACEMENTS = ("before", "after")


# ---------------------------------------------------------------------------------------------
# Strategies, as the study described them


@dataclasses.dataclass(frozen=True)
class StrategyInfo:
  """What the report needs to know of a strategy, from ``results.json``'s ``meta["strategies"]``."""

  name: str
  rule: str = ""
  baseline: bool = False
  fixed: bool = False
  global_threshold: bool = False
  swept: bool = False


def strategy_infos(meta: Mapping, names: Iterable[str]) -> dict[str, StrategyInfo]:
  """Each strategy's :class:`StrategyInfo`, in the study's order (names it does not describe, from
  runs made by hand, are looked up among the built-in strategies, then follow sorted)."""
  described = dict(meta.get("strategies") or {})
  names = set(names)
  if not described or not names <= set(described):
    from clipchain.study.strategies import STRATEGIES

    for name in sorted(names - set(described)):
      known = STRATEGIES.get(name)
      described[name] = {} if known is None else known.describe()
  fields = {f.name for f in dataclasses.fields(StrategyInfo)} - {"name"}
  infos = {
    name: StrategyInfo(name, **{k: v for k, v in info.items() if k in fields})
    for name, info in described.items()
  }
  # The baseline first, then the study's order.
  order = sorted(infos, key=lambda n: not infos[n].baseline)
  return {n: infos[n] for n in order if n in names}


def placement_order(names: Iterable[str]) -> list[str]:
  names = set(names)
  return [p for p in PLACEMENTS if p in names] + sorted(names - set(PLACEMENTS))


# ---------------------------------------------------------------------------------------------
# Intervals


@dataclasses.dataclass(frozen=True)
class Interval:
  """A point estimate with its bootstrap interval; ``None`` entries when nothing could be computed.

  ``resolved`` when the interval excludes zero.
  """

  value: float | None
  low: float | None
  high: float | None

  @property
  def resolved(self) -> bool:
    if self.low is None or self.high is None:
      return False
    return self.low > 0 or self.high < 0


def _resamples(seeds: Sequence[int]) -> np.ndarray:
  """``BOOTSTRAP_RESAMPLES`` resamples of ``seeds`` with replacement, from a fixed generator."""
  rng = np.random.default_rng(0)
  return np.asarray(seeds)[rng.integers(0, len(seeds), (BOOTSTRAP_RESAMPLES, len(seeds)))]


def bootstrap(statistic: Callable[[Sequence[int]], float | None], seeds: Sequence[int]) -> Interval:
  """``statistic`` of every seed, with its percentile bootstrap interval over resampled seeds.

  Resamples on which the statistic is undefined (None or NaN) are left out; infinite values are
  kept (a baseline with no stable learning rate makes a clipped run's advantage infinite).
  """
  seeds = sorted(set(seeds))
  value = statistic(seeds)
  if value is None or not seeds:
    return Interval(None, None, None)
  # A statistic of seeds depends on which seeds were drawn and how often, not in what order: with
  # few seeds most resamples repeat one of a few multisets, each computed once.
  cache: dict[tuple[int, ...], float | None] = {}

  def of(sample) -> float | None:
    key = tuple(sorted(int(s) for s in sample))
    if key not in cache:
      cache[key] = statistic(list(key))
    return cache[key]

  values = [of(sample) for sample in _resamples(seeds)]
  defined = np.asarray([v for v in values if v is not None and not math.isnan(v)], np.float64)
  if defined.size == 0:
    return Interval(value, None, None)
  tail = (1.0 - CONFIDENCE) / 2.0
  low, high = np.quantile(defined, [tail, 1.0 - tail], method="inverted_cdf")
  return Interval(value, float(low), float(high))


# ---------------------------------------------------------------------------------------------
# One strategy in one placement, over every learning rate and seed


def relative(value: float | None, base: float | None) -> float | None:
  """``(value - base) / |base|``: positive when ``value`` is the larger (worse) loss."""
  if value is None or base is None:
    return None
  if base == 0:
    return 0.0 if value == 0 else math.copysign(math.inf, value)
  return (value - base) / abs(base)


def _finite(value) -> float | None:
  return None if value is None else finite_or_none(value)


def failed(run: RunRecord) -> bool:
  """Diverged, or without a finite final loss to rank it by."""
  return run.diverged or _finite(run.final_loss) is None


class Grid:
  """The runs of one strategy and placement (one task and optimizer), by learning rate and seed."""

  def __init__(self, runs: Sequence[RunRecord]):
    self.runs = list(runs)
    self.by: dict[tuple[float, int], RunRecord] = {(r.lr, r.seed): r for r in self.runs}
    self.lrs = tuple(sorted({r.lr for r in self.runs}))
    self.seeds = tuple(sorted({r.seed for r in self.runs}))

  def at(self, lr: float, seeds: Sequence[int]) -> list[RunRecord]:
    return [self.by[(lr, s)] for s in seeds if (lr, s) in self.by]

  def stable_lrs(self, seeds: Sequence[int]) -> tuple[float, ...]:
    """The learning rates at which none of ``seeds`` (repeats allowed) failed."""
    return tuple(
      lr for lr in self.lrs if (runs := self.at(lr, seeds)) and not any(failed(r) for r in runs)
    )

  def finals(self, seeds: Sequence[int]) -> dict[float, float]:
    """The mean final loss over ``seeds`` at each stable learning rate."""
    out = {}
    for lr in self.stable_lrs(seeds):
      values = [_finite(r.final_loss) for r in self.at(lr, seeds)]
      out[lr] = float(np.mean([v for v in values if v is not None]))
    return out

  def best(self, seeds: Sequence[int]) -> tuple[float | None, float | None]:
    """``(best lr, its mean final loss)``: the stable lr with the lowest mean final loss."""
    finals = self.finals(seeds)
    if not finals:
      return None, None
    lr = min(finals, key=lambda lr: (finals[lr], lr))
    return lr, finals[lr]


def _mean(values: Iterable) -> float | None:
  values = [v for v in (_finite(v) for v in values) if v is not None]
  return sum(values) / len(values) if values else None


@dataclasses.dataclass(frozen=True)
class Row:
  """What one strategy achieved in one placement, over every lr and seed of a task and optimizer.

  Attributes:
    strategy: The strategy's name.
    placement: ``"before"`` or ``"after"`` the optimizer.
    baseline: Whether it is the unclipped baseline.
    lrs: Every learning rate run, ascending.
    stable_lrs: The learning rates at which no seed diverged, ascending.
    best_lr: The stable lr with the lowest mean final loss; None when no lr is stable.
    best_final: That mean final loss (mean over seeds).
    steps_to_target: Median over seeds at ``best_lr``, not reaching the target counting as never;
      None when the median run does not reach it.
    eval_loss: Mean over seeds at ``best_lr``; None when the task has no eval loss.
    spikes: Mean loss-spike count per run, over every lr and seed.
    clipped_fraction: Mean share of clipped steps per run, over every lr and seed.
    over_clipped: How many runs were over-clipped.
    skipped_steps: Mean skipped steps per run, over every lr and seed.
    step_cost: Time per step relative to the baseline in the same task and optimizer.
    steps_per_second: Mean steps per second of the cell.
    runs: How many runs the row holds.
    stable_runs: How many of them did not diverge.
    finals: The mean final loss (over seeds) at each stable learning rate.
    loss_change: The best final loss relative to the baseline's, with its interval over seeds
      (negative: lower loss); None entries without a baseline.
    stable_gain: Stable learning rates minus the baseline's, with its interval over seeds.
  """

  strategy: str
  placement: str
  baseline: bool
  lrs: tuple[float, ...]
  stable_lrs: tuple[float, ...]
  best_lr: float | None
  best_final: float | None
  steps_to_target: float | None
  eval_loss: float | None
  spikes: float | None
  clipped_fraction: float | None
  over_clipped: int
  skipped_steps: float | None
  step_cost: float | None
  steps_per_second: float | None
  runs: int
  stable_runs: int
  finals: dict
  loss_change: Interval = Interval(None, None, None)
  stable_gain: Interval = Interval(None, None, None)

  @property
  def n_stable(self) -> int:
    return len(self.stable_lrs)

  @property
  def stable_count(self) -> str:
    """``"k/n"``: stable learning rates out of those run."""
    return f"{self.n_stable}/{len(self.lrs)}"

  @property
  def stable_range(self) -> str:
    """``"lo..hi"`` over the stable lrs, a dash when there is none, marked when it has gaps."""
    if not self.stable_lrs:
      return "—"
    lo, hi = self.stable_lrs[0], self.stable_lrs[-1]
    text = f"{lo:g}" if lo == hi else f"{lo:g}..{hi:g}"
    inside = [lr for lr in self.lrs if lo <= lr <= hi]
    return text if len(inside) == self.n_stable else text + " (with gaps)"

  @property
  def label(self) -> str:
    return f"{self.strategy} ({self.placement})"


def summarize(
  runs: Sequence[RunRecord], baseline: Sequence[RunRecord] | None = None, is_baseline=False
) -> Row:
  """The :class:`Row` of the runs of one strategy and placement, compared with ``baseline``'s."""
  grid = Grid(runs)
  seeds = grid.seeds
  best_lr, best_final = grid.best(seeds)
  steps = eval_loss = None
  if best_lr is not None:
    at_best = grid.at(best_lr, seeds)
    reached = [_finite(r.steps_to_target) for r in at_best]
    median = float(np.median([math.inf if s is None else s for s in reached]))
    steps = median if math.isfinite(median) else None
    eval_loss = _mean(r.eval_loss for r in at_best)
  loss_change = stable_gain = Interval(None, None, None)
  if baseline is not None and not is_baseline:
    base = Grid(baseline)
    common = sorted(set(seeds) & set(base.seeds))

    def change(sample):
      return relative(grid.best(sample)[1], base.best(sample)[1])

    def gain(sample):
      return float(len(grid.stable_lrs(sample)) - len(base.stable_lrs(sample)))

    loss_change, stable_gain = bootstrap(change, common), bootstrap(gain, common)
  return Row(
    strategy=runs[0].strategy,
    placement=runs[0].placement,
    baseline=is_baseline,
    lrs=grid.lrs,
    stable_lrs=grid.stable_lrs(seeds),
    best_lr=best_lr,
    best_final=best_final,
    steps_to_target=steps,
    eval_loss=eval_loss,
    spikes=_mean(r.spike_count for r in runs),
    clipped_fraction=_mean(r.clipped_fraction for r in runs),
    over_clipped=sum(r.over_clipped for r in runs),
    skipped_steps=_mean(r.skipped_steps for r in runs),
    step_cost=_mean(r.step_cost for r in runs),
    steps_per_second=_mean(r.steps_per_second for r in runs),
    runs=len(runs),
    stable_runs=sum(not failed(r) for r in runs),
    finals=grid.finals(seeds),
    loss_change=loss_change,
    stable_gain=stable_gain,
  )


def rank_key(row: Row) -> tuple:
  """The lowest best final loss first, then the most stable learning rates, then name, placement.

  A strategy that never diverges but never learns (a threshold so tight the model barely moves) is
  stable everywhere; ranking by loss first keeps it from looking best.
  """
  best = math.inf if row.best_final is None else row.best_final
  # On a tie, before ranks first: it is the usual place to clip, so it is the one to recommend.
  placement = PLACEMENTS.index(row.placement) if row.placement in PLACEMENTS else len(PLACEMENTS)
  return (best, -row.n_stable, row.strategy, placement, row.placement)


def baseline_runs(runs: Sequence[RunRecord], infos: Mapping[str, StrategyInfo]):
  """The baseline's runs among ``runs`` (one task and optimizer), placement before when both."""
  base = [r for r in runs if infos.get(r.strategy, StrategyInfo(r.strategy)).baseline]
  placements = placement_order(r.placement for r in base)
  return [r for r in base if r.placement == placements[0]] if base else []


def rank(runs: Sequence[RunRecord], infos: Mapping[str, StrategyInfo] | None = None) -> list[Row]:
  """One :class:`Row` per strategy and placement of ``runs`` (one task and optimizer), ranked, each
  compared with the baseline."""
  infos = infos or strategy_infos({}, {r.strategy for r in runs})
  base = baseline_runs(runs, infos) or None
  rows = []
  for (name, placement), group in _groups(runs).items():
    is_base = infos.get(name, StrategyInfo(name)).baseline
    # The baseline's runs are the same in either placement: it gets one row.
    if base is not None and is_base and placement != base[0].placement:
      continue
    rows.append(summarize(group, base, is_base))
  return sorted(rows, key=rank_key)


# ---------------------------------------------------------------------------------------------
# The verdict for one task and optimizer


def helps(row: Row) -> bool:
  """Resolved better than the baseline: more stable learning rates in every resample of the seeds
  (and not a resolved worse loss), or a resolved lower best loss by more than the tolerance (and
  not resolved fewer stable learning rates)."""
  gain, change = row.stable_gain, row.loss_change
  loss_worse = change.resolved and (change.value or 0.0) > SAME_LOSS_TOLERANCE
  loss_better = change.resolved and (change.value or 0.0) < -SAME_LOSS_TOLERANCE
  fewer = gain.resolved and (gain.value or 0.0) < 0
  more = gain.resolved and (gain.value or 0.0) > 0
  return (more and not loss_worse) or (loss_better and not fewer)


def worse_reasons(row: Row, base: Row) -> list[str]:
  """Why ``row`` is resolved worse than the baseline ``base``; empty when it is not.

  Over-clipped runs are reported on their own (:func:`recommend`): a strategy may over-clip at one
  learning rate and still be the best at another.
  """
  reasons = []
  gain, change = row.stable_gain, row.loss_change
  if gain.resolved and (gain.value or 0.0) < 0:
    reasons.append(f"stable at {row.stable_count} lrs vs {base.stable_count} without clipping")
  if change.resolved and (change.value or 0.0) > SAME_LOSS_TOLERANCE:
    reasons.append(
      f"best final loss {fmt(row.best_final)} vs {fmt(base.best_final)} "
      f"({interval_text(change, percent=True)})"
    )
  return reasons


def _over_clipped_text(rows: Sequence[Row]) -> str:
  over = [r for r in rows if r.over_clipped]
  if not over:
    return ""
  return (
    " Over-clipped (the clip changed nearly every step and the loss ended above no clipping's at "
    "the same lr and seed): "
    + "; ".join(f"{r.label} in {r.over_clipped} of {r.runs} runs" for r in over)
    + "."
  )


@dataclasses.dataclass(frozen=True)
class Recommendation:
  """The verdict for one task and optimizer (see :func:`recommend` for the rule).

  Attributes:
    verdict: ``"helps"``, ``"indistinguishable"``, ``"worse"``, ``"no baseline"`` or
      ``"only baseline"``.
    recommended: The recommended row; None when clipping did not help.
    baseline: The baseline's row; None when it was not run.
    worse: The clipped rows resolved worse than the baseline, each with its reason.
    text: The sentences the report prints.
  """

  verdict: str
  recommended: Row | None
  baseline: Row | None
  worse: tuple[tuple[Row, str], ...]
  text: str


def fmt(value: float | None, digits: int = 4) -> str:
  return "—" if value is None else f"{value:.{digits}g}"


def _signed(value: float, percent: bool) -> str:
  if not math.isfinite(value):
    return "+inf" if value > 0 else "-inf"
  return f"{value * 100:+.0f}%" if percent else f"{value:+.3g}"


def interval_text(interval: Interval, *, percent: bool = False) -> str:
  """``"-19% [-25%, -12%]"``; a dash when there is nothing to show."""
  if interval.value is None:
    return "—"
  text = _signed(interval.value, percent)
  if interval.low is not None and interval.high is not None:
    text += f" [{_signed(interval.low, percent)}, {_signed(interval.high, percent)}]"
  return text


def _stable_text(row: Row) -> str:
  return f"{row.stable_count} lrs" + (f" ({row.stable_range})" if row.stable_lrs else "")


def recommend(rows: Sequence[Row]) -> Recommendation:
  """Recommends a strategy for one task and optimizer from its ranked rows, by a fixed rule.

  A clipped row *helps* when it is resolved better than the baseline (:func:`helps`): stable at
  more learning rates in every bootstrap resample of the seeds, or a best final loss lower by more
  than 5 % with an interval that excludes zero. Among the rows that help, the one stable at the most
  learning rates, then with the lowest best final loss, is recommended. A row is *worse* when it is
  resolved worse (fewer stable learning rates, or a best final loss more than 5 % higher). When no
  row helps, clipping is *indistinguishable* from no clipping, unless every clipped row is worse.
  Rows with over-clipped runs are named in the text either way.
  """
  baselines = sorted((r for r in rows if r.baseline), key=lambda r: r.placement != "before")
  clipped = sorted((r for r in rows if not r.baseline), key=rank_key)
  if not clipped:
    return Recommendation("only baseline", None, None, (), "Only the unclipped baseline was run.")
  if not baselines:
    top = clipped[0]
    return Recommendation(
      "no baseline",
      top,
      None,
      (),
      f"No unclipped baseline was run, so nothing can be said about whether clipping helps; "
      f"the top-ranked strategy is {top.label}, stable at {top.stable_count} lrs.",
    )
  base = baselines[0]
  worse = tuple((row, " and ".join(why)) for row in clipped if (why := worse_reasons(row, base)))
  worse_text = (
    " Resolved worse than no clipping: "
    + "; ".join(f"{row.label}: {why}" for row, why in worse)
    + "."
    if worse
    else ""
  )
  base_text = (
    f"Without clipping: stable at {_stable_text(base)}, best final loss {fmt(base.best_final)}."
  )
  helping = [r for r in clipped if helps(r)]
  if not helping:
    verdict = "worse" if len(worse) == len(clipped) else "indistinguishable"
    lead = (
      "Indistinguishable from no clipping: no strategy is resolved better over the seeds (more "
      "stable lrs in every resample, or a best final loss more than 5% lower with an interval "
      "excluding zero)."
    )
    text = f"{lead} {base_text}{worse_text}{_over_clipped_text(clipped)}"
    return Recommendation(verdict, None, base, worse, text)
  top = min(helping, key=lambda r: (-r.n_stable, rank_key(r)))
  gain = top.n_stable - base.n_stable
  extra = [lr for lr in top.stable_lrs if lr not in base.stable_lrs]
  widen = f"{gain:+d} stable lrs ({interval_text(top.stable_gain)} over seeds)" + (
    " where it reaches final loss "
    + ", ".join(f"{fmt(top.finals.get(lr))} at lr {lr:g}" for lr in extra)
    if extra
    else ""
  )
  others = [r.label for r in helping if r is not top]
  text = (
    f"Recommended: {top.label}, stable at {_stable_text(top)}, best final loss "
    f"{fmt(top.best_final)} ({interval_text(top.loss_change, percent=True)} vs none); {widen}."
    + (f" Also resolved better: {', '.join(others)}." if others else "")
    + f" {base_text}{worse_text}{_over_clipped_text(clipped)}"
  )
  return Recommendation("helps", top, base, worse, text)


# ---------------------------------------------------------------------------------------------
# Where clipping rescues training, and published orderings


@dataclasses.dataclass(frozen=True)
class Rescue:
  """At one learning rate where the baseline spiked or diverged, a strategy that did better.

  Attributes:
    optimizer, lr: Where.
    strategy, placement: Which strategy.
    baseline_failed, failed: Seeds that diverged, without and with the strategy (of ``seeds``).
    baseline_spikes, spikes: Mean spikes per run, without and with it.
    spike_change: The paired difference in spikes per run, with its interval over seeds.
    seeds: Seeds compared.
    final: The strategy's mean final loss there (not diverging is not learning).
    baseline_final: The baseline's mean final loss over its seeds that did not diverge; None when
      every seed diverged.
  """

  optimizer: str
  lr: float
  strategy: str
  placement: str
  baseline_failed: int
  failed: int
  baseline_spikes: float
  spikes: float
  spike_change: Interval
  seeds: int
  final: float | None = None
  baseline_final: float | None = None


def _paired_mean(a: Mapping[int, float], b: Mapping[int, float]) -> Callable:
  return lambda sample: float(np.mean([a[s] - b[s] for s in sample]))


def rescues(runs: Sequence[RunRecord], infos: Mapping[str, StrategyInfo]) -> list[Rescue]:
  """Every (optimizer, lr, strategy) at which the baseline diverged or spiked in some seed and the
  strategy diverged in no seed, and either diverged in fewer seeds or spiked less: the settings
  the report shows first. Sorted by the strategy's final loss there, then its spikes."""
  found = []
  for optimizer in sorted({r.optimizer for r in runs}):
    mine = [r for r in runs if r.optimizer == optimizer]
    base = Grid(baseline_runs(mine, infos))
    if not base.runs:
      continue
    for lr in base.lrs:
      base_runs = {r.seed: r for r in base.at(lr, base.seeds)}
      base_failed = sum(failed(r) for r in base_runs.values())
      base_spikes = {s: float(r.spike_count) for s, r in base_runs.items()}
      if not base_failed and not any(base_spikes.values()):
        continue
      for (name, placement), group in _groups(mine).items():
        if infos.get(name, StrategyInfo(name)).baseline:
          continue
        at = {r.seed: r for r in group if r.lr == lr and r.seed in base_runs}
        if len(at) != len(base_runs):
          continue
        n_failed = sum(failed(r) for r in at.values())
        spikes = {s: float(r.spike_count) for s, r in at.items()}
        fewer_failed = n_failed < base_failed
        fewer_spikes = sum(spikes.values()) < sum(base_spikes.values())
        if n_failed == 0 and (fewer_failed or fewer_spikes):
          found.append(
            Rescue(
              optimizer,
              lr,
              name,
              placement,
              base_failed,
              n_failed,
              float(np.mean(list(base_spikes.values()))),
              float(np.mean(list(spikes.values()))),
              bootstrap(_paired_mean(spikes, base_spikes), sorted(at)),
              len(at),
              _mean(r.final_loss for r in at.values()),
              _mean(r.final_loss for r in base_runs.values() if not failed(r)),
            )
          )
  return sorted(
    found,
    key=lambda r: (
      r.optimizer,
      r.lr,
      math.inf if r.final is None else r.final,
      r.spikes,
      r.strategy,
      r.placement,
    ),
  )


def _groups(runs: Sequence[RunRecord]) -> dict[tuple[str, str], list[RunRecord]]:
  groups: dict[tuple[str, str], list[RunRecord]] = {}
  for run in runs:
    groups.setdefault((run.strategy, run.placement), []).append(run)
  return groups


@dataclasses.dataclass(frozen=True)
class OrderingCheck:
  """A published ordering tested on one task and optimizer (see
  :class:`~clipchain.study.strategies.PaperComparison`).

  Attributes:
    title, claim: The paper's.
    optimizer: Where it was tested.
    lrs: The learning rates compared: those at which the last strategy of the ordering diverged in
      some seed or spiked; all of them when it never did.
    table: ``(strategy, diverged runs, runs, mean spikes per run, mean final loss of the runs that
      did not diverge)`` per strategy of the ordering, in its order, then the others run.
    held: Whether each consecutive pair of the ordering held (no more diverged runs, and no more
      spikes per run, than the next).
    text: One sentence saying whether the ordering held, and where not.
  """

  title: str
  claim: str
  optimizer: str
  lrs: tuple[float, ...]
  table: tuple[tuple[str, int, int, float, float | None], ...]
  held: tuple[bool, ...]
  text: str


def check_ordering(
  runs: Sequence[RunRecord], comparison: Mapping, optimizer: str
) -> OrderingCheck | None:
  """Tests one published ordering on the runs of one task; None when a strategy of it is missing."""
  ordering = tuple(comparison["ordering"])
  placement = comparison.get("placement", "before")
  mine = [r for r in runs if r.optimizer == optimizer and r.placement == placement]
  groups = {name: [r for r in mine if r.strategy == name] for name in {r.strategy for r in mine}}
  if any(not groups.get(name) for name in ordering):
    return None
  last = groups[ordering[-1]]
  lrs = tuple(sorted({r.lr for r in last if failed(r) or r.spike_count}))
  lrs = lrs or tuple(sorted({r.lr for r in last}))
  names = list(ordering) + sorted(set(groups) - set(ordering))
  table = []
  for name in names:
    at = [r for r in groups[name] if r.lr in lrs]
    finals = [r.final_loss for r in at if not failed(r)]
    table.append(
      (
        name,
        sum(failed(r) for r in at),
        len(at),
        float(np.mean([r.spike_count for r in at])) if at else 0.0,
        _mean(finals),
      )
    )
  by_name = {t[0]: t for t in table}
  held = tuple(
    by_name[a][1] <= by_name[b][1] and by_name[a][3] <= by_name[b][3]
    for a, b in itertools.pairwise(ordering)
  )
  pairs = [
    f"{a} {'≤' if ok else '>'} {b} "
    f"(diverged {by_name[a][1]}/{by_name[a][2]} vs {by_name[b][1]}/{by_name[b][2]}, spikes per "
    f"run {by_name[a][3]:.2g} vs {by_name[b][3]:.2g})"
    for (a, b), ok in zip(itertools.pairwise(ordering), held)
  ]
  where = ", ".join(f"{lr:g}" for lr in lrs)
  verdict = "held" if all(held) else ("did not hold" if not any(held) else "held only in part")
  text = f"With {optimizer} at lr {where}, the ordering {' ≤ '.join(ordering)} {verdict}: " + (
    "; ".join(pairs) + "."
  )
  return OrderingCheck(
    comparison["title"], comparison["claim"], optimizer, lrs, tuple(table), held, text
  )


def instability(
  runs: Sequence[RunRecord], infos: Mapping[str, StrategyInfo]
) -> tuple[bool | None, str]:
  """Whether a task really becomes unstable without clipping: the baseline diverged or spiked at
  some lr in every seed (each optimizer's detail in the sentence).

  Returns:
    ``(verdict, sentence)``; the verdict is None when no baseline was run.
  """
  base = [
    r
    for opt in sorted({r.optimizer for r in runs})
    for r in baseline_runs([r for r in runs if r.optimizer == opt], infos)
  ]
  if not base:
    return None, "Not known: the unclipped baseline was not run on this task."
  seeds = sorted({r.seed for r in base})
  exploded = sorted({r.seed for r in base if failed(r) or r.spike_count})
  per_optimizer = []
  for opt in sorted({r.optimizer for r in base}):
    runs_opt = [r for r in base if r.optimizer == opt]
    parts = []
    for lr in sorted({r.lr for r in runs_opt}):
      at = [r for r in runs_opt if r.lr == lr]
      n_failed = sum(failed(r) for r in at)
      spikes = float(np.mean([r.spike_count for r in at]))
      if n_failed:
        parts.append(f"diverged at lr {lr:g} in {n_failed}/{len(at)} seeds")
      elif spikes:
        parts.append(f"{spikes:.2g} spikes per run at lr {lr:g}")
    per_optimizer.append(f"{opt}: {', '.join(parts) if parts else 'never diverged or spiked'}")
  detail = f" ({'; '.join(per_optimizer)})."
  if len(exploded) == len(seeds):
    return True, (
      f"Yes: without clipping every seed ({len(seeds)}) diverged or spiked at some lr{detail}"
    )
  return False, (
    f"No: without clipping {len(exploded)} of {len(seeds)} seeds diverged or spiked at any lr, so "
    f"this task did not reliably become unstable{detail}"
  )


# ---------------------------------------------------------------------------------------------
# What results.json holds besides the runs


def _interval_json(interval: Interval) -> dict:
  return {
    "estimate": interval.value,
    "low": interval.low,
    "high": interval.high,
    "resolved": interval.resolved,
  }


def _finite_json(value):
  """JSON has no infinities: an infinite effect (a baseline with no stable lr) is written as
  null, with ``resolved`` still saying whether it was."""
  return value if value is None or math.isfinite(value) else None


def summary(runs: Sequence[RunRecord], meta: Mapping) -> dict:
  """The analysis as ``results.json``'s ``analysis``: per task and optimizer, every row with its
  effects and intervals, the verdict, the rescues, and the published orderings tested."""
  main = [r for r in runs if not r.sweep]
  infos = strategy_infos(meta, {r.strategy for r in main})
  out: dict = {"confidence": CONFIDENCE, "resamples": BOOTSTRAP_RESAMPLES, "tasks": {}}
  for task in sorted({r.task for r in main}):
    task_runs = [r for r in main if r.task == task]
    per_optimizer = {}
    for opt in sorted({r.optimizer for r in task_runs}):
      mine = [r for r in task_runs if r.optimizer == opt]
      rows = rank(mine, infos)
      recommendation = recommend(rows)
      per_optimizer[opt] = {
        "verdict": recommendation.verdict,
        "recommended": None
        if recommendation.recommended is None
        else {
          "strategy": recommendation.recommended.strategy,
          "placement": recommendation.recommended.placement,
        },
        "text": recommendation.text,
        "rows": [
          {
            "strategy": row.strategy,
            "placement": row.placement,
            "baseline": row.baseline,
            "stable_lrs": list(row.stable_lrs),
            "best_lr": row.best_lr,
            "best_final": row.best_final,
            "spikes": row.spikes,
            "over_clipped": row.over_clipped,
            "loss_change": {
              k: _finite_json(v) if k != "resolved" else v
              for k, v in _interval_json(row.loss_change).items()
            },
            "stable_gain": _interval_json(row.stable_gain),
          }
          for row in rows
        ],
        "rescues": [
          {
            "lr": r.lr,
            "strategy": r.strategy,
            "placement": r.placement,
            "diverged": [r.baseline_failed, r.failed],
            "spikes": [r.baseline_spikes, r.spikes],
            "spike_change": _interval_json(r.spike_change),
            "final_loss": r.final,
          }
          for r in rescues(mine, infos)
          if r.optimizer == opt
        ],
      }
    orderings = []
    for comparison in meta.get("published_orderings") or []:
      for opt in sorted({r.optimizer for r in task_runs}):
        if opt in comparison.get("optimizers", ()):
          check = check_ordering(task_runs, comparison, opt)
          if check is not None:
            orderings.append(
              {
                "title": check.title,
                "optimizer": opt,
                "lrs": list(check.lrs),
                "held": list(check.held),
                "text": check.text,
              }
            )
    verdict, sentence = instability(task_runs, infos)
    out["tasks"][task] = {
      "unstable_without_clipping": verdict,
      "instability": sentence,
      "optimizers": per_optimizer,
      "published_orderings": orderings,
    }
  return out

"""One run of a study as a typed record: built once from its curves, written to ``results.json``,
read by the report."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Threshold:
  """How a run's threshold was chosen.

  Attributes:
    rule: The strategy's rule, in words.
    value: The fixed threshold used; None for an adaptive one.
    multiplier: The multiple of the warm-up measurement (fixed thresholds); None for adaptive ones.
  """

  rule: str
  value: float | None
  multiplier: float | None


@dataclasses.dataclass(frozen=True)
class CurvesRef:
  """Where a run's per-step curves are: row ``index`` of the arrays in ``file`` (under ``out``)."""

  file: str
  index: int


@dataclasses.dataclass(frozen=True)
class RunRecord:
  """What one run did; the fields of a run in ``results.json`` (see ``docs/study.md``).

  Attributes:
    task: The task's name.
    strategy: The strategy's name.
    placement: ``"before"`` or ``"after"`` the optimizer.
    optimizer: The optimizer's name.
    lr: The learning rate.
    seed: The seed (initial parameters and data).
    threshold: See :class:`Threshold`.
    sweep: True for the extra runs of the threshold sweep (multiplier not 1).
    steps: Training steps.
    initial_loss: The loss of the first batch, before any update.
    final_loss: Mean training loss over the last 10 % of steps; None when not finite.
    best_loss: The lowest finite training loss.
    eval_loss: The loss on the task's held-out batch after training; None without one.
    diverged: :func:`clipchain.study.metrics.diverged`.
    steps_to_target: :func:`clipchain.study.metrics.steps_to_target`.
    spike_count: :func:`clipchain.study.metrics.spike_count`.
    clipped_fraction: The share of steps on which the clip changed the update.
    over_clipped: :func:`clipchain.study.metrics.over_clipped`, against the unclipped run.
    skipped_steps: Steps a guard skipped.
    steps_per_second: Run-steps per second of the run's cell, compile excluded.
    step_cost: The cell's time over the unclipped cell's (same task, optimizer, placement); None
      when no unclipped cell was run.
    curves: Where its per-step curves are.
  """

  task: str
  strategy: str
  placement: str
  optimizer: str
  lr: float
  seed: int
  threshold: Threshold
  sweep: bool
  steps: int
  initial_loss: float | None
  final_loss: float | None
  best_loss: float | None
  eval_loss: float | None
  diverged: bool
  steps_to_target: int | None
  spike_count: int
  clipped_fraction: float
  over_clipped: bool
  skipped_steps: int
  steps_per_second: float | None
  step_cost: float | None
  curves: CurvesRef | None

  def to_json(self) -> dict[str, Any]:
    """The record as ``results.json`` holds it."""
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> RunRecord:
    """A record from ``results.json`` (or a dict of the same fields; missing flags are False,
    missing numbers None), so reports can be made again from saved results."""
    threshold = data.get("threshold") or {}
    curves = data.get("curves")
    fields: dict[str, Any] = {f.name: data.get(f.name) for f in dataclasses.fields(cls)}
    for flag in ("sweep", "diverged", "over_clipped"):
      fields[flag] = bool(fields[flag])
    for count in ("spike_count", "skipped_steps"):
      fields[count] = int(fields[count] or 0)
    fields["clipped_fraction"] = float(fields["clipped_fraction"] or 0.0)
    fields["threshold"] = Threshold(
      str(threshold.get("rule", "")), threshold.get("value"), threshold.get("multiplier")
    )
    fields["curves"] = (
      None
      if not curves or curves.get("file") is None or curves.get("index") is None
      else CurvesRef(str(curves["file"]), int(curves["index"]))
    )
    fields["lr"] = float(fields["lr"])
    fields["seed"] = int(fields["seed"])
    fields["steps"] = int(fields["steps"] or 0)
    return cls(**fields)


def as_records(runs) -> list[RunRecord]:
  """``runs`` as :class:`RunRecord` s, whether given as records or as ``results.json`` dicts."""
  return [run if isinstance(run, RunRecord) else RunRecord.from_json(run) for run in runs]

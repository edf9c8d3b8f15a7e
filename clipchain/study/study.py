"""A whole study: cells run (or resumed), costs compared, results and report written atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clipchain._version import __version__
from clipchain.study import metrics, runner
from clipchain.study.strategies import (
  DEFAULT_LRS,
  OPTIMIZERS,
  PLACEMENTS,
  STRATEGIES,
  SWEEP_MULTIPLIERS,
)
from clipchain.study.task import Task

#: Every strategy, in the order the report lists them.
ALL_STRATEGIES = tuple(STRATEGIES)


def _check_names(kind: str, names: Sequence[str], known) -> tuple[str, ...]:
  if isinstance(names, str):
    names = (names,)
  names = tuple(names)
  if not names:
    raise ValueError(f"{kind} must name at least one, got {names!r}.")
  for name in names:
    if name not in known:
      raise ValueError(f"{kind} holds an unknown name {name!r}; choose from {', '.join(known)}.")
  return tuple(dict.fromkeys(names))


def _check_positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {value!r}.")
  if value < 1:
    raise ValueError(f"{name} must be at least 1, got {value!r}.")
  return int(value)


def _check_lrs(lrs, task: Task, optimizers) -> dict[str, tuple[float, ...]]:
  if lrs is not None and (isinstance(lrs, (str, bytes)) or not isinstance(lrs, Iterable)):
    raise TypeError(
      f"lrs must be a sequence of learning rates, a mapping {{optimizer: sequence}} or None; "
      f"got {lrs!r}."
    )
  if isinstance(lrs, Mapping):
    unknown = [k for k in lrs if k not in OPTIMIZERS]
    if unknown:
      raise ValueError(
        f"lrs names optimizers that do not exist: {unknown}; choose from {', '.join(OPTIMIZERS)}."
      )
  grids = {}
  for optimizer in optimizers:
    grid: Any
    if lrs is None:
      grid = task.lrs.get(optimizer, DEFAULT_LRS[optimizer])
    elif isinstance(lrs, Mapping):
      grid = lrs.get(optimizer, task.lrs.get(optimizer, DEFAULT_LRS[optimizer]))
    else:
      grid = lrs
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Iterable):
      raise TypeError(f"lrs for {optimizer} must be a sequence of numbers, got {grid!r}.")
    grid = tuple(grid)
    if not grid:
      raise ValueError(f"lrs must hold at least one learning rate, got {grid!r}.")
    for lr in grid:
      if isinstance(lr, bool) or not isinstance(lr, (int, float, np.floating, np.integer)):
        raise TypeError(f"lrs must be numbers, got {lr!r}.")
      if not np.isfinite(lr) or lr <= 0:
        raise ValueError(f"lrs must be positive and finite, got {lr!r}.")
    grids[optimizer] = tuple(sorted({float(lr) for lr in grid}))
  return grids


def _check_tasks(tasks) -> None:
  """Tasks are ``Task`` objects with distinct names whose params are a non-empty float pytree."""
  seen: dict[str, str] = {}
  for task in tasks:
    if not isinstance(task, Task):
      raise TypeError(f"task must be a clipchain.study.Task, got {task!r}.")
    safe = runner.file_safe(task.name)
    if safe in seen:
      raise ValueError(
        f"tasks {seen[safe]!r} and {task.name!r} would share file names; give every task of a "
        "study its own name."
      )
    seen[safe] = task.name
    shapes = jax.eval_shape(task.init, jax.random.PRNGKey(0))
    leaves = jax.tree.leaves(shapes)
    if not leaves:
      raise ValueError(f"Task {task.name!r}: init returned no parameters ({shapes!r}).")
    not_float = [leaf.dtype for leaf in leaves if not jnp.issubdtype(leaf.dtype, jnp.inexact)]
    if not_float:
      raise TypeError(
        f"Task {task.name!r}: every parameter must be a float array (they are differentiated); "
        f"init returned leaves of dtype {sorted({str(d) for d in not_float})}."
      )


#: What a study writes into its output directory; nothing else there is ever touched.
OUTPUTS = ("curves", "plots", "report.md", "report.html", "results.json")
#: Finished cells of a study still running (or interrupted), inside the output directory.
PARTIAL = ".clipchain-partial"
#: Where the results and report are written before they are moved into place.
STAGING = ".clipchain-writing"


def check_out(out) -> pathlib.Path:
  """The output directory, created now: refused when it is a file or cannot be created."""
  if not isinstance(out, (str, os.PathLike)):
    raise TypeError(f"out must be a path (str or os.PathLike), got {out!r}.")
  out = pathlib.Path(out)
  if out.exists() and not out.is_dir():
    raise ValueError(f"out must be a directory, but {str(out)!r} is a file.")
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise ValueError(f"out {str(out)!r} cannot be created: {error.strerror or error}.") from None
  if not os.access(out, os.W_OK):
    raise ValueError(f"out {str(out)!r} is not writable.")
  return out


def _cell_key(cell: runner.Cell, calibration) -> str:
  """What must match for a finished cell to be reused by ``--resume``."""
  spec = {
    "lrs": cell.lrs,
    "seeds": cell.seeds,
    "steps": cell.steps,
    "calibration": (None if calibration is None else dataclasses.astuple(calibration)),
    "clipchain": __version__,
  }
  return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _load_partial(partial: pathlib.Path, cell, key) -> runner.CellResult | None:
  meta_path = partial / f"{cell.name}.json"
  if not meta_path.exists():
    return None
  saved = json.loads(meta_path.read_text())
  if saved.get("key") != key:
    return None
  with np.load(partial / f"{cell.name}.npz") as data:
    curves = {k: data[k] for k in data.files}
  return runner.CellResult(saved["records"], curves, saved["seconds"])


def _save_partial(partial: pathlib.Path, cell, key, result: runner.CellResult) -> None:
  partial.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(partial / f"{cell.name}.npz.tmp.npz", **result.curves)  # type: ignore[arg-type]
  os.replace(partial / f"{cell.name}.npz.tmp.npz", partial / f"{cell.name}.npz")
  payload = {"key": key, "records": result.records, "seconds": result.seconds}
  (partial / f"{cell.name}.json.tmp").write_text(json.dumps(payload))
  os.replace(partial / f"{cell.name}.json.tmp", partial / f"{cell.name}.json")


def _fill_costs(results: list[tuple[runner.Cell, runner.CellResult]]) -> None:
  """Fills ``step_cost``: a cell's time over ``none``'s with the same task, optimizer, placement."""
  baseline = {
    (c.task.name, c.optimizer, c.placement): r.seconds
    for c, r in results
    if c.strategy.name == "none"
  }
  for cell, result in results:
    base = baseline.get((cell.task.name, cell.optimizer, cell.placement))
    for record in result.records:
      record["step_cost"] = None if base is None else result.seconds / base


def _summary_line(cell: runner.Cell, result: runner.CellResult) -> str:
  records = result.records
  stable = sorted({r["lr"] for r in records} - {r["lr"] for r in records if r["diverged"]})
  finals = [r["final_loss"] for r in records if not r["diverged"] and r["final_loss"] is not None]
  best = f"{min(finals):.4g}" if finals else "-"
  return (
    f"{cell.name}: {len(stable)}/{len(cell.lrs)} lrs stable, best final loss {best}, "
    f"{result.seconds:.2f} s"
  )


@contextlib.contextmanager
def _progress(enabled: bool, total: int):
  if not enabled:
    yield lambda description, runs: None
    return
  from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
  )

  with Progress(
    TextColumn("{task.description}"),
    BarColumn(),
    MofNCompleteColumn(),
    TextColumn("runs"),
    TimeElapsedColumn(),
    TextColumn("ETA"),
    TimeRemainingColumn(),
    transient=False,
  ) as bar:
    handle = bar.add_task("study", total=total)
    yield lambda description, runs: bar.update(handle, advance=runs, description=description)


def run_study(
  tasks: Sequence[Task],
  *,
  strategies: Sequence[str] = ALL_STRATEGIES,
  optimizers: Sequence[str] = ("sgd", "adam"),
  placements: Sequence[str] = ("before",),
  lrs: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
  seeds: int = 2,
  steps: int | None = None,
  sweep: Sequence[float] = SWEEP_MULTIPLIERS,
  out: str | os.PathLike[str] | None = None,
  resume: bool = False,
  progress: bool = False,
  verbose: bool = False,
  args: Mapping | None = None,
) -> tuple[list[dict], dict]:
  """Runs every cell of every task; writes ``out`` when given. Returns ``(records, meta)``."""
  strategies = _check_names("strategies", strategies, STRATEGIES)
  optimizers = _check_names("optimizers", optimizers, OPTIMIZERS)
  placements = _check_names("placements", placements, PLACEMENTS)
  seeds = _check_positive_int("seeds", seeds)
  if steps is not None:
    steps = _check_positive_int("steps", steps)
  _check_tasks(tasks)
  grids = {task.name: _check_lrs(lrs, task, optimizers) for task in tasks}
  out = None if out is None else check_out(out)

  started = datetime.datetime.now(datetime.timezone.utc)
  clock = time.perf_counter()
  cells = []
  for task in tasks:
    cells += runner.cells_for(
      task,
      strategies=strategies,
      optimizers=optimizers,
      placements=placements,
      lrs=grids[task.name],
      seeds=seeds,
      steps=steps or task.steps,
      sweep=sweep,
    )
  partial = None if out is None else out / PARTIAL
  writer = jax.process_index() == 0
  calibrations = {}
  results = []

  def calibration_of(cell):
    if not cell.strategy.calibrated:
      return None
    where = (cell.task.name, cell.placement, cell.optimizer if cell.placement == "after" else "")
    if where not in calibrations:
      calibrations[where] = runner.calibrate(cell.task, cell.optimizer, cell.placement)
    return calibrations[where]

  total_runs = sum(len(cell.lrs) * cell.seeds for cell in cells)
  with _progress(progress and writer, total_runs) as advance:
    for cell in cells:
      calibration = calibration_of(cell)
      key = _cell_key(cell, calibration)
      result = _load_partial(partial, cell, key) if (resume and partial) else None
      if result is None:
        compiled, padded = runner.compile_cell(cell, calibration)
        result = runner.execute_cell(cell, calibration, compiled, padded)
        if partial is not None and writer:
          _save_partial(partial, cell, key, result)
      results.append((cell, result))
      advance(cell.name, len(cell.lrs) * cell.seeds)
      if verbose and writer:
        print(_summary_line(cell, result), file=sys.stderr, flush=True)
  _fill_costs(results)
  records = [record for _, result in results for record in result.records]
  meta = {
    "clipchain": __version__,
    "jax": jax.__version__,
    "optax": _version("optax"),
    "flax": _version("flax"),
    "devices": [str(d) for d in jax.devices()],
    "process_count": jax.process_count(),
    "args": dict(args)
    if args is not None
    else {
      "tasks": [t.name for t in tasks],
      "strategies": list(strategies),
      "optimizers": list(optimizers),
      "placements": list(placements),
      "lrs": {t: {o: list(g) for o, g in grid.items()} for t, grid in grids.items()},
      "seeds": seeds,
      "steps": steps,
      "sweep": list(sweep),
    },
    "tasks": {
      t.name: {
        "description": t.description,
        "target_loss": t.target_loss,
        "steps": steps or t.steps,
      }
      for t in tasks
    },
    "metrics": {
      "final_fraction": metrics.FINAL_FRACTION,
      "divergence_factor": metrics.DIVERGENCE_FACTOR,
      "target_window": metrics.TARGET_WINDOW,
      "spike_window": metrics.SPIKE_WINDOW,
      "spike_factor": metrics.SPIKE_FACTOR,
    },
    "started": started.isoformat(timespec="seconds"),
    "seconds": time.perf_counter() - clock,
  }
  if out is not None and writer:
    write(out, records, meta, {cell.name: result.curves for cell, result in results})
    shutil.rmtree(out / PARTIAL, ignore_errors=True)
  return records, meta


def _version(package: str) -> str | None:
  try:
    from importlib.metadata import version

    return version(package)
  except Exception:
    return None


def write(out: pathlib.Path, records, meta, curves: Mapping[str, Mapping[str, np.ndarray]]) -> None:
  """Writes results, curves and report to a staging directory, then moves each into ``out``.

  Only the study's own outputs (:data:`OUTPUTS`) are replaced; anything else in ``out`` is left
  alone. ``results.json`` is moved last, so that it never describes a report not yet in place.
  """
  from clipchain.study import report

  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  staging = out / STAGING
  shutil.rmtree(staging, ignore_errors=True)
  (staging / "curves").mkdir(parents=True)
  for name, arrays in curves.items():
    np.savez_compressed(staging / "curves" / f"{name}.npz", **arrays)  # type: ignore[arg-type]
  payload = {"meta": meta, "runs": records}
  (staging / "results.json").write_text(json.dumps(payload, indent=1, allow_nan=False))
  report.write_report(records, meta, staging)
  for name in OUTPUTS:
    target = out / name
    if target.is_dir() and not target.is_symlink():
      shutil.rmtree(target)
    elif target.exists() or target.is_symlink():
      target.unlink()
    if (staging / name).exists():
      os.replace(staging / name, target)
  shutil.rmtree(staging, ignore_errors=True)


def run(
  task: Task,
  *,
  strategies: Sequence[str] = ALL_STRATEGIES,
  optimizers: Sequence[str] = ("sgd", "adam"),
  placements: Sequence[str] = ("before",),
  lrs: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
  seeds: int = 2,
  steps: int | None = None,
  out: str | os.PathLike[str] | None = None,
) -> list[dict]:
  """Trains ``task`` with every strategy, optimizer, placement, learning rate and seed.

  Args:
    task: A :class:`Task` (or the name of a built-in one).
    strategies: Names from :data:`clipchain.study.strategies.STRATEGIES`.
    optimizers: Names from :data:`clipchain.study.strategies.OPTIMIZERS`.
    placements: ``"before"`` (clip the gradient) and/or ``"after"`` (clip the optimizer's update).
    lrs: One grid for every optimizer, a mapping ``{optimizer: grid}``, or None for the task's.
    seeds: How many seeds (0 .. seeds - 1) each learning rate runs.
    steps: Training steps of every run; None for the task's default.
    out: A directory to write ``results.json``, the curves and the report to; None writes nothing.

  Returns:
    One record per run, the dicts of ``results.json``'s ``runs``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from clipchain import study
    >>> task = study.Task(
    ...     "line",
    ...     init=lambda key: {"w": jnp.zeros(())},
    ...     loss=lambda p, batch: jnp.mean((p["w"] * batch[0] - batch[1]) ** 2),
    ...     batches=lambda key, step: (jnp.ones(4), 2 * jnp.ones(4)),
    ... )
    >>> records = study.run(task, strategies=["none", "global"], optimizers=["sgd"],
    ...                     lrs=[0.1], seeds=1, steps=50)
    >>> sorted({r["strategy"] for r in records})
    ['global', 'none']
    >>> round(min(r["final_loss"] for r in records if r["strategy"] == "none"), 3)
    0.0
  """
  if isinstance(task, str):
    from clipchain.study.tasks import get_task

    task = get_task(task)
  records, _ = run_study(
    [task],
    strategies=strategies,
    optimizers=optimizers,
    placements=placements,
    lrs=lrs,
    seeds=seeds,
    steps=steps,
    out=out,
  )
  return records

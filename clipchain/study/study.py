"""A whole study: cells run (or resumed), costs compared, results and report written atomically."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import pathlib
import shutil
import socket
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
  PAPER_COMPARISONS,
  PLACEMENTS,
  STRATEGIES,
  SWEEP_MULTIPLIERS,
  Calibration,
  Strategy,
)
from clipchain.study.task import Task, check_batches

#: Every strategy, in the order the report lists them.
ALL_STRATEGIES = tuple(STRATEGIES)
#: Cells compiled together, in parallel, before they run one after the other.
COMPILE_BATCH = 8


def _compile_workers() -> int:
  """Threads compiling cells at once: one per core (XLA compiles a program on one thread)."""
  return max(1, min(COMPILE_BATCH, os.cpu_count() or 1))


#: Seeds per learning rate unless told otherwise: three, the fewest whose bootstrap over seeds
#: can resolve a difference that holds in every seed.
DEFAULT_SEEDS = 3


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


def _check_optimizers(optimizers, tasks) -> dict[str, tuple[str, ...]]:
  """Each task's optimizers, from one list for all or a mapping ``{task name: list}``."""
  if isinstance(optimizers, Mapping):
    names = {t.name for t in tasks}
    unknown = sorted(set(optimizers) - names)
    missing = sorted(names - set(optimizers))
    if unknown or missing:
      raise ValueError(
        f"optimizers maps tasks {sorted(optimizers)!r}; it must name each task of the study "
        f"({sorted(names)!r}) and no other."
      )
    return {t.name: _check_names("optimizers", optimizers[t.name], OPTIMIZERS) for t in tasks}
  checked = _check_names("optimizers", optimizers, OPTIMIZERS)
  return {t.name: checked for t in tasks}


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


#: The study's own files at the top of its output directory; ``curves/`` and ``plots/`` hold more.
#: Only files the study wrote (listed in its ``results.json``) are ever replaced or removed.
TOP_FILES = ("report.md", "report.html", "results.json")
#: Finished cells of a study still running (or interrupted), inside the output directory.
PARTIAL = ".clipchain-partial"
#: Where the results and report are written before they are moved into place.
STAGING = ".clipchain-writing"
#: Held by the study writing into the directory: a second study into it is refused.
LOCK = ".clipchain-lock"


def check_out(out) -> pathlib.Path:
  """The output directory as a path, checked but not created: refused when it is empty, a file,
  or cannot be written."""
  if not isinstance(out, (str, os.PathLike)):
    raise TypeError(f"out must be a path (str or os.PathLike), got {out!r}.")
  if not os.fspath(out):
    raise ValueError("out must name a directory, got '' (use '.' for the current directory).")
  out = pathlib.Path(out)
  if out.exists() and not out.is_dir():
    raise ValueError(f"out must be a directory, but {str(out)!r} is a file.")
  existing = next((p for p in (out, *out.parents) if p.exists()), None)
  if existing is not None and not os.access(existing, os.W_OK):
    raise ValueError(
      f"out {str(out)!r} cannot be created or written: {str(existing)!r} is not writable."
    )
  return out


def _create_out(out: pathlib.Path) -> None:
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise ValueError(f"out {str(out)!r} cannot be created: {error.strerror or error}.") from None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


@contextlib.contextmanager
def _locked(out: pathlib.Path):
  """Holds ``out/.clipchain-lock`` while a study writes into ``out``; a lock left by a process
  that has ended (on this host) is taken over."""
  lock = out / LOCK
  me = {"pid": os.getpid(), "host": socket.gethostname()}
  for _ in range(2):
    try:
      fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      try:
        holder = json.loads(lock.read_text())
      except (OSError, ValueError):
        holder = {}
      stale = holder.get("host") == me["host"] and not _pid_alive(int(holder.get("pid", -1)))
      if stale:
        lock.unlink(missing_ok=True)
        continue
      raise ValueError(
        f"out {str(out)!r} is in use by another study (process {holder.get('pid', '?')} on "
        f"{holder.get('host', '?')}); wait for it, or choose another --out. If no study is "
        f"running, remove {str(lock)!r}."
      ) from None
    with os.fdopen(fd, "w") as handle:
      json.dump(me, handle)
    break
  try:
    yield
  finally:
    lock.unlink(missing_ok=True)


def _owned_files(out: pathlib.Path) -> set[str]:
  """The files (relative paths) the last study into ``out`` wrote, read from its results.json.

  Raises:
    ValueError: ``out`` holds a ``report.*`` or ``results.json`` the study did not write.
  """
  results = out / "results.json"
  owned: set[str] = set()
  if results.exists():
    try:
      saved = json.loads(results.read_text())
      meta = saved["meta"]
      owned = set(meta.get("files") or ())
      if not owned:
        # Written before studies listed their files: its curves, and the plots named after its
        # tasks, as every version named them.
        owned = set(TOP_FILES) | {r["curves"]["file"] for r in saved["runs"] if r.get("curves")}
        prefixes = tuple(runner.file_safe(t) for t in meta.get("tasks") or ())
        if prefixes and (out / "plots").is_dir():
          owned |= {
            f"plots/{p.name}"
            for p in (out / "plots").iterdir()
            if p.suffix == ".png" and p.name.startswith(prefixes)
          }
    except (OSError, ValueError, KeyError, TypeError):
      raise ValueError(
        f"out {str(out)!r} holds a results.json that is not a study's; choose another --out or "
        "move it."
      ) from None
  foreign = [name for name in TOP_FILES if (out / name).exists() and name not in owned]
  if foreign:
    raise ValueError(
      f"out {str(out)!r} holds {', '.join(foreign)}, not written by a study; choose another "
      "--out or move them."
    )
  return owned


def _cell_key(cell: runner.Cell, calibration, task_fingerprint: str) -> str:
  """What must match for a finished cell to be reused by ``--resume``."""
  spec = {
    "task": task_fingerprint,
    "lrs": cell.lrs,
    "seeds": cell.seeds,
    "steps": cell.steps,
    "rule": cell.strategy.rule,
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
  return runner.CellResult(curves, saved["seconds"])


def _save_partial(partial: pathlib.Path, cell, key, result: runner.CellResult) -> None:
  partial.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(partial / f"{cell.name}.npz.tmp.npz", **result.curves)  # type: ignore[arg-type]
  os.replace(partial / f"{cell.name}.npz.tmp.npz", partial / f"{cell.name}.npz")
  payload = {"key": key, "seconds": result.seconds}
  (partial / f"{cell.name}.json.tmp").write_text(json.dumps(payload))
  os.replace(partial / f"{cell.name}.json.tmp", partial / f"{cell.name}.json")


def _records(results: list[tuple[runner.Cell, Calibration | None, runner.CellResult]]):
  """Every run's :class:`RunRecord`, each cell's measured against its baseline cell."""
  baselines = {(c.task.name, c.optimizer, c.lrs): r for c, _, r in results if c.strategy.baseline}
  records = []
  for cell, calibration, result in results:
    baseline = baselines.get((cell.task.name, cell.optimizer, cell.lrs))
    records += runner.records_of(cell, calibration, result, baseline)
  return records


def _summary_line(cell: runner.Cell, result: runner.CellResult) -> str:
  loss = result.curves["loss"]
  # Rows are learning-rate major, as Cell.runs gives them; the lrs as given, not float32 copies.
  row_lrs = [lr for lr in cell.lrs for _ in range(cell.seeds)]
  bad = {lr for lr, row in zip(row_lrs, loss) if metrics.diverged(row)}
  finals = [
    f
    for lr, row in zip(row_lrs, loss)
    if lr not in bad and (f := metrics.final_loss(row)) is not None
  ]
  best = f"{min(finals):.4g}" if finals else "-"
  stable = len(set(cell.lrs) - bad)
  return (
    f"{cell.name}: {stable}/{len(cell.lrs)} lrs stable, best final loss {best}, "
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


def _check_strategies(strategies) -> tuple[Strategy, ...]:
  """Names from :data:`STRATEGIES` or :class:`Strategy` objects, as objects, each name once."""
  if isinstance(strategies, (str, Strategy)):
    strategies = (strategies,)
  if isinstance(strategies, Iterable):
    strategies = tuple(strategies)
  else:
    raise TypeError(
      f"strategies must be a sequence of names or Strategy objects, got {strategies!r}."
    )
  if not strategies:
    raise ValueError(f"strategies must name at least one, got {strategies!r}.")
  chosen: dict[str, Strategy] = {}
  for item in strategies:
    if isinstance(item, Strategy):
      strategy = item
    elif isinstance(item, str):
      (name,) = _check_names("strategies", (item,), STRATEGIES)
      strategy = STRATEGIES[name]
    else:
      raise TypeError(f"strategies must hold names or Strategy objects, got {item!r}.")
    if strategy.name in chosen and chosen[strategy.name] != strategy:
      raise ValueError(f"strategies holds two different strategies named {strategy.name!r}.")
    chosen[strategy.name] = strategy
  if sum(s.baseline for s in chosen.values()) > 1:
    raise ValueError("strategies holds more than one baseline (baseline=True); keep one.")
  return tuple(chosen.values())


def _no_cells_reason(strategies, optimizers, placements) -> str:
  parts = []
  for s in strategies:
    where = []
    if s.optimizers is not None:
      where.append(f"with {', '.join(s.optimizers)}")
    if s.wraps_optimizer:
      where.append("after only")
    parts.append(f"{s.name} runs {' '.join(where) or 'everywhere'}")
  return (
    f"nothing to run: no strategy of {', '.join(s.name for s in strategies)} applies to "
    f"optimizers {', '.join(optimizers)} in placement {', '.join(placements)} "
    f"({'; '.join(parts)})."
  )


def run_study(
  tasks: Sequence[Task],
  *,
  strategies: Sequence[str | Strategy] = ALL_STRATEGIES,
  optimizers: Sequence[str] | Mapping[str, Sequence[str]] = ("sgd", "adam"),
  placements: Sequence[str] = ("before",),
  lrs: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
  seeds: int = DEFAULT_SEEDS,
  steps: int | None = None,
  sweep: Sequence[float] = SWEEP_MULTIPLIERS,
  out: str | os.PathLike[str] | None = None,
  resume: bool = False,
  progress: bool = False,
  verbose: bool = False,
  args: Mapping | None = None,
) -> tuple[list[dict], dict]:
  """Runs every cell of every task; writes ``out`` when given. Returns ``(records, meta)``.

  Everything is checked before anything is trained or written: a bad argument, a grid in which no
  strategy applies, a task whose batches are not a pure function of ``(key, step)``, an ``out``
  that is empty, a file, in use by another study or holding a report the study did not write.
  ``optimizers`` is one list for every task, or a mapping ``{task name: optimizers}`` naming every
  task.
  """
  _check_tasks(tasks)
  chosen = _check_strategies(strategies)
  per_task = _check_optimizers(optimizers, tasks)
  placements = _check_names("placements", placements, PLACEMENTS)
  seeds = _check_positive_int("seeds", seeds)
  if steps is not None:
    steps = _check_positive_int("steps", steps)
  grids = {task.name: _check_lrs(lrs, task, per_task[task.name]) for task in tasks}
  out = None if out is None else check_out(out)
  cells = []
  for task in tasks:
    check_batches(task, steps or task.steps)
    cells += runner.cells_for(
      task,
      strategies=chosen,
      optimizers=per_task[task.name],
      placements=placements,
      lrs=grids[task.name],
      seeds=seeds,
      steps=steps or task.steps,
      sweep=sweep,
    )
  if not cells:
    every = tuple(dict.fromkeys(o for names in per_task.values() for o in names))
    raise ValueError(_no_cells_reason(chosen, every, placements))
  writer = jax.process_index() == 0
  with contextlib.ExitStack() as stack:
    owned: set[str] = set()
    if out is not None and writer:
      _create_out(out)
      stack.enter_context(_locked(out))
      owned = _owned_files(out)
    try:
      records, meta, results = _run_cells(
        tasks, chosen, cells, grids, out, resume, progress, verbose, args,
        dict(optimizers=per_task, placements=placements, seeds=seeds, steps=steps, sweep=sweep),
      )  # fmt: skip
    except StopIteration:
      # A Python iterator behind a task's functions, exhausted while tracing; check_batches
      # catches the ones it can tell apart, this the ones whose batches all look the same.
      raise TypeError(
        "A task's batches (or init or loss) raised StopIteration while being traced: it must be a "
        "pure JAX function of (key, step), not read from a Python iterator or generator. Index "
        "arrays by step, or generate the batch from jax.random.fold_in(key, step)."
      ) from None
    if out is not None and writer:
      write(out, records, meta, {c.name: r.curves for c, _, r in results}, owned=owned)
      shutil.rmtree(out / PARTIAL, ignore_errors=True)
  return [r.to_json() for r in records], meta


def _run_cells(tasks, strategies, cells, grids, out, resume, progress, verbose, args, options):
  started = datetime.datetime.now(datetime.timezone.utc)
  clock = time.perf_counter()
  partial = None if out is None else out / PARTIAL
  writer = jax.process_index() == 0
  fingerprints = {task.name: runner.fingerprint(task) for task in tasks}
  calibrations: dict[tuple, Calibration] = {}
  computed: dict[tuple, runner.CellResult] = {}
  results = []

  def calibration_of(cell):
    if not cell.strategy.calibrated:
      return None
    where = (cell.task.name, cell.placement, cell.optimizer if cell.placement == "after" else "")
    if where not in calibrations:
      calibrations[where] = runner.calibrate(cell.task, cell.optimizer, cell.placement)
    return calibrations[where]

  total_runs = sum(len(cell.lrs) * cell.seeds for cell in cells)
  keys = {}
  for cell in cells:
    keys[cell.name] = _cell_key(cell, calibration_of(cell), fingerprints[cell.task.name])
  with _progress(progress and writer, total_runs) as advance:
    # Cells are compiled a batch at a time, on every core at once (compiling is single-threaded),
    # then run one after the other with nothing else on the machine, so that each cell's time,
    # the study's cost column, is its own.
    for start in range(0, len(cells), COMPILE_BATCH):
      batch = cells[start : start + COMPILE_BATCH]
      pending = {}
      for cell in batch:
        if cell.program in computed or cell.program in pending:
          continue
        saved = _load_partial(partial, cell, keys[cell.name]) if (resume and partial) else None
        if saved is not None:
          computed[cell.program] = saved
        else:
          pending[cell.program] = cell
      with concurrent.futures.ThreadPoolExecutor(_compile_workers()) as pool:
        compiled = dict(
          zip(
            pending,
            pool.map(lambda c: runner.compile_cell(c, calibration_of(c)), pending.values()),
          )
        )
      for cell in batch:
        result = computed.get(cell.program)
        if result is None:
          executable, padded = compiled.pop(cell.program)
          result = runner.execute_cell(cell, calibration_of(cell), executable, padded)
          if partial is not None and writer:
            _save_partial(partial, cell, keys[cell.name], result)
          computed[cell.program] = result
        results.append((cell, calibration_of(cell), result))
        advance(cell.name, len(cell.lrs) * cell.seeds)
        if verbose and writer:
          print(_summary_line(cell, result), file=sys.stderr, flush=True)
  records = _records(results)
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
      "strategies": [s.name for s in strategies],
      "optimizers": {t: list(names) for t, names in options["optimizers"].items()},
      "placements": list(options["placements"]),
      "lrs": {t: {o: list(g) for o, g in grid.items()} for t, grid in grids.items()},
      "seeds": options["seeds"],
      "steps": options["steps"],
      "sweep": list(options["sweep"]),
    },
    "tasks": {
      t.name: {
        "description": t.description,
        "target_loss": t.target_loss,
        "steps": options["steps"] or t.steps,
        "fingerprint": fingerprints[t.name],
      }
      for t in tasks
    },
    "strategies": {s.name: s.describe() for s in strategies},
    "published_orderings": [c.to_json() for c in PAPER_COMPARISONS],
    "metrics": {
      "final_fraction": metrics.FINAL_FRACTION,
      "divergence_factor": metrics.DIVERGENCE_FACTOR,
      "target_window": metrics.TARGET_WINDOW,
      "spike_window": metrics.SPIKE_WINDOW,
      "spike_sigmas": metrics.SPIKE_SIGMAS,
      "spike_floor": metrics.SPIKE_FLOOR,
      "spike_min_scale": metrics.SPIKE_MIN_SCALE,
      "overclip_fraction": metrics.OVERCLIP_FRACTION,
      "overclip_margin": metrics.OVERCLIP_MARGIN,
    },
    "started": started.isoformat(timespec="seconds"),
    "seconds": time.perf_counter() - clock,
  }
  return records, meta, results


def _version(package: str) -> str | None:
  try:
    from importlib.metadata import version

    return version(package)
  except Exception:
    return None


def _study_files(root: pathlib.Path) -> set[str]:
  files = {name for name in TOP_FILES if (root / name).is_file()}
  for folder in ("curves", "plots"):
    if (root / folder).is_dir():
      files |= {p.relative_to(root).as_posix() for p in (root / folder).iterdir() if p.is_file()}
  return files


def write(
  out: pathlib.Path,
  records,
  meta,
  curves: Mapping[str, Mapping[str, np.ndarray]],
  *,
  owned: set[str] | None = None,
) -> None:
  """Writes results, curves and report to a staging directory, then moves each file into ``out``.

  Only files the study writes, or the previous study into ``out`` wrote (``owned``, from its
  ``results.json``), are replaced or removed; anything else in ``out``, inside ``plots/`` and
  ``curves/`` too, is left alone, and a new file whose name a user's file already has is refused
  before anything is moved. ``results.json`` is moved last, so that it never describes a report not
  yet in place.

  Raises:
    ValueError: A file the study would write exists in ``out`` and was not written by a study; the
      results are kept in the staging directory, which the message names.
  """
  from clipchain.study import report

  out = pathlib.Path(out)
  owned = _owned_files(out) if owned is None else owned
  staging = out / STAGING
  shutil.rmtree(staging, ignore_errors=True)
  (staging / "curves").mkdir(parents=True)
  for name, arrays in curves.items():
    np.savez_compressed(staging / "curves" / f"{name}.npz", **arrays)  # type: ignore[arg-type]
  report.write_report(records, meta, staging)
  written = _study_files(staging) | {"results.json"}
  from clipchain.study import analysis

  payload = {
    "meta": {**meta, "files": sorted(written)},
    "runs": [r.to_json() for r in records],
    "analysis": analysis.summary(records, meta),
  }
  (staging / "results.json").write_text(json.dumps(payload, indent=1, allow_nan=False))
  clash = sorted(name for name in written if (out / name).exists() and name not in owned)
  if clash:
    raise ValueError(
      f"out {str(out)!r} holds {', '.join(clash)}, not written by a study, where the study would "
      f"write its own; nothing was replaced, and the results are in {str(staging)!r}."
    )
  for name in sorted(owned - written):
    (out / name).unlink(missing_ok=True)
  for name in [*sorted(written - {"results.json"}), "results.json"]:
    target = out / name
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging / name, target)
  shutil.rmtree(staging, ignore_errors=True)
  for folder in ("curves", "plots"):
    with contextlib.suppress(OSError):  # left when it still holds a user's files
      (out / folder).rmdir()


def run(
  task: Task,
  *,
  strategies: Sequence[str] = ALL_STRATEGIES,
  optimizers: Sequence[str] = ("sgd", "adam"),
  placements: Sequence[str] = ("before",),
  lrs: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
  seeds: int = DEFAULT_SEEDS,
  steps: int | None = None,
  out: str | os.PathLike[str] | None = None,
) -> list[dict]:
  """Trains ``task`` with every strategy, optimizer, placement, learning rate and seed.

  Args:
    task: A :class:`Task` (or the name of a built-in one).
    strategies: Names from :data:`clipchain.study.strategies.STRATEGIES`, or
      :class:`~clipchain.study.strategies.Strategy` objects of your own.
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

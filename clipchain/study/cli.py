"""The ``clipchain`` command line: ``clipchain study [options]``."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from typing import Any

from clipchain.study.strategies import OPTIMIZERS, PLACEMENTS, STRATEGIES

#: What ``clipchain study`` runs without options (``make demo``, under 3 minutes on 2 CPU cores):
#: the two showcase tasks, each with the optimizer whose instability it shows (SGD's gradient
#: explosion through time on ``rnn-adding``, Adam's loss spikes after rare corrupted batches on
#: ``outlier-batches``), both placements, three seeds, and one strategy of each kind: the fixed
#: global clip (with its threshold sweep), AGC, an adaptive global threshold and the guarded clip.
#: ``--full`` runs every task, strategy and optimizer.
DEFAULT_TASKS = ("rnn-adding", "outlier-batches")
DEFAULT_STRATEGIES = ("none", "global", "unit", "zclip", "global+skip")
#: The optimizers of the default tasks; a task chosen with ``--task`` and not named here runs
#: :data:`DEFAULT_OPTIMIZERS`, and ``--optimizers`` applies to every task.
DEFAULT_TASK_OPTIMIZERS = {"rnn-adding": ("sgd",), "outlier-batches": ("adam",)}
DEFAULT_OPTIMIZERS = ("sgd", "adam")
DEFAULT_PLACEMENT = "both"
#: ``--quick``: a smoke run in seconds.
QUICK = {
  "tasks": ("rnn-adding",),
  "strategies": ("none", "global", "zclip"),
  "optimizers": ("sgd",),
  "placements": ("before",),
  "steps": 60,
  "seeds": 1,
  "sweep": (),
}


def _positive_float(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"invalid learning rate: {text!r} is not a number") from None
  if not math.isfinite(value) or value <= 0:
    raise argparse.ArgumentTypeError(f"invalid learning rate: {text!r} must be positive and finite")
  return value


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"invalid count: {text!r} is not an integer") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"invalid count: {text!r} must be at least 1")
  return value


def _parser() -> argparse.ArgumentParser:
  return _parsers()[0]


def _parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
  """The ``clipchain`` parser and its ``study`` subcommand's (which reports bad values)."""
  from clipchain.study.tasks import TASKS

  parser = argparse.ArgumentParser(prog="clipchain", description="clipchain's command line.")
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  study = commands.add_parser(
    "study",
    help="train models with each clipping strategy and optimizer, and report which keeps "
    "training stable",
    description="Trains the built-in tasks with every clipping strategy, optimizer, placement, "
    "learning rate and seed, and writes results.json, per-step curves and a report (report.html, "
    "report.md) to --out. --quick and --full change the defaults; an option given explicitly "
    "always wins.",
  )
  study.add_argument(
    "--task",
    nargs="+",
    choices=list(TASKS),
    metavar="NAME",
    help=f"tasks to train, from {', '.join(TASKS)} (default: {' '.join(DEFAULT_TASKS)})",
  )
  study.add_argument(
    "--strategies",
    nargs="+",
    choices=list(STRATEGIES),
    metavar="NAME",
    help=f"clipping strategies, from {', '.join(STRATEGIES)} (default: "
    f"{' '.join(DEFAULT_STRATEGIES)})",
  )
  study.add_argument(
    "--optimizers",
    nargs="+",
    choices=list(OPTIMIZERS),
    metavar="NAME",
    help=f"optimizers for every task, from {', '.join(OPTIMIZERS)} (default: "
    + ", ".join(f"{' '.join(o)} on {t}" for t, o in DEFAULT_TASK_OPTIMIZERS.items())
    + f"; {' '.join(DEFAULT_OPTIMIZERS)} on the other tasks)",
  )
  study.add_argument(
    "--placement",
    choices=[*PLACEMENTS, "both"],
    help="clip the gradient before the optimizer, the optimizer's update after it, or both "
    f"(default: {DEFAULT_PLACEMENT})",
  )
  study.add_argument(
    "--lrs",
    nargs="+",
    type=_positive_float,
    metavar="FLOAT",
    help="learning rates for every optimizer (default: each task's log grid per optimizer, from "
    "stable to unstable)",
  )
  study.add_argument(
    "--seeds", type=_positive_int, metavar="N", help="seeds per learning rate (default: 3)"
  )
  study.add_argument(
    "--steps",
    type=_positive_int,
    metavar="N",
    help="training steps per run (default: each task's own)",
  )
  study.add_argument(
    "--out",
    default="clipchain-study",
    metavar="DIR",
    help="output directory; only files a study wrote are ever replaced, and a second study into "
    "it while one runs is refused (default: clipchain-study)",
  )
  size = study.add_mutually_exclusive_group()
  size.add_argument(
    "--quick",
    action="store_true",
    help="a smoke run in seconds: by default rnn-adding, none/global/zclip, sgd, before, 60 "
    "steps, one seed, no threshold sweep",
  )
  size.add_argument(
    "--full",
    action="store_true",
    help="by default every task, strategy and optimizer, both placements",
  )
  study.add_argument(
    "--resume",
    action="store_true",
    help="reuse the cells an interrupted study into the same --out finished",
  )
  study.add_argument(
    "-v", "--verbose", action="store_true", help="print a one-line summary per finished cell"
  )
  return parser, study


def _options(args) -> dict:
  """The study's options: the defaults, those of --quick or --full, then what was given."""
  from clipchain.study.strategies import SWEEP_MULTIPLIERS
  from clipchain.study.study import DEFAULT_SEEDS
  from clipchain.study.tasks import TASKS

  options: dict[str, Any] = {
    "tasks": DEFAULT_TASKS,
    "strategies": DEFAULT_STRATEGIES,
    "optimizers": None,
    "placements": PLACEMENTS if DEFAULT_PLACEMENT == "both" else (DEFAULT_PLACEMENT,),
    "lrs": None,
    "seeds": DEFAULT_SEEDS,
    "steps": None,
    "sweep": SWEEP_MULTIPLIERS,
  }
  if args.full:
    options.update(
      tasks=tuple(TASKS),
      strategies=tuple(STRATEGIES),
      optimizers=tuple(OPTIMIZERS),
      placements=PLACEMENTS,
    )
  if args.quick:
    options.update(QUICK)
  given: dict[str, Any] = {
    "tasks": args.task,
    "strategies": args.strategies,
    "optimizers": args.optimizers,
    "placements": None
    if args.placement is None
    else (PLACEMENTS if args.placement == "both" else (args.placement,)),
    "lrs": args.lrs,
    "seeds": args.seeds,
    "steps": args.steps,
  }
  for key, value in given.items():
    if value is not None:
      options[key] = tuple(dict.fromkeys(value)) if isinstance(value, list) else value
  if options["optimizers"] is None:
    options["optimizers"] = {
      task: DEFAULT_TASK_OPTIMIZERS.get(task, DEFAULT_OPTIMIZERS) for task in options["tasks"]
    }
  return options


def _join_processes() -> None:
  """Joins the processes named by ``CLIPCHAIN_*`` environment variables, as the examples do.

  Every process runs the same cells; each cell's batch of runs is sharded across the devices of
  every process, the curves gathered, and process 0 alone writes the report.
  """
  coordinator = os.environ.get("CLIPCHAIN_COORDINATOR")
  if coordinator:
    import jax

    jax.distributed.initialize(
      coordinator_address=coordinator,
      num_processes=int(os.environ["CLIPCHAIN_NUM_PROCESSES"]),
      process_id=int(os.environ["CLIPCHAIN_PROCESS_ID"]),
      initialization_timeout=60,
    )


def study(args, parser) -> int:
  import jax

  from clipchain.study import report
  from clipchain.study.study import check_out, run_study
  from clipchain.study.tasks import get_task

  try:
    out = check_out(args.out)
  except ValueError as error:
    parser.error(f"argument --out: {error}")
  options = _options(args)
  tasks = [get_task(name) for name in options.pop("tasks")]
  _join_processes()
  recorded = {
    "tasks": [t.name for t in tasks],
    **{k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()},
    "quick": args.quick,
    "full": args.full,
  }
  try:
    records, meta = run_study(
      tasks,
      **options,
      out=out,
      resume=args.resume,
      progress=sys.stderr.isatty() or args.verbose,
      verbose=args.verbose,
      args=recorded,
    )
  except KeyboardInterrupt:
    print(
      f"\nInterrupted: the finished cells are kept; rerun with --resume to continue into {out}.",
      file=sys.stderr,
    )
    return 130
  except (ValueError, TypeError) as error:
    # Everything run_study refuses is refused before anything is trained or written.
    parser.error(str(error))
  if jax.process_index() == 0:
    print(report.summary_table(records, meta))
    print(f"\nReport: {out / 'report.html'} (and report.md, results.json, curves/)")
  return 0


def _one_device_per_core() -> None:
  """On CPU, one JAX device per core, so that a cell's runs execute in parallel.

  JAX gives the CPU one device by default, and a small program runs on one core; the study shards
  its runs across devices. Left alone when the user chose a device count, or JAX already started.
  """
  import jax

  chosen = os.environ.get("JAX_NUM_CPU_DEVICES") or "device_count" in os.environ.get(
    "XLA_FLAGS", ""
  )
  devices = jax.config.jax_num_cpu_devices  # type: ignore[attr-defined]  # a flag, not in the stubs
  if not chosen and devices in (-1, 1):
    # Once the backend is initialised the setting is refused: its devices are kept.
    with contextlib.suppress(RuntimeError):
      jax.config.update("jax_num_cpu_devices", os.cpu_count() or 1)


def main(argv=None) -> int:
  """Runs ``clipchain COMMAND``; returns the exit code (2 for bad arguments, as argparse)."""
  parser, study_parser = _parsers()
  args = parser.parse_args(argv)
  _one_device_per_core()
  return study(args, study_parser)


if __name__ == "__main__":
  raise SystemExit(main())

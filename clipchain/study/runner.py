"""Runs a study: one compiled program per cell, over every learning rate and seed.

A *cell* is one task, optimizer, strategy, placement and threshold multiplier. Its runs, which
differ only by learning rate and seed, are one compiled program: the batch of runs is sharded across
every device, each device computes its runs ``vmap``-ped in fixed-width groups (:func:`lanes`), and
a run's steps are a ``lax.scan``: the host waits once per cell, never inside a run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import clipchain
from clipchain.study import metrics
from clipchain.study.record import CurvesRef, RunRecord, Threshold
from clipchain.study.strategies import OPTIMIZERS, Calibration, Strategy, not_orthogonalised
from clipchain.study.task import Task

#: Batches at the initial parameters from which fixed thresholds are calibrated.
WARMUP_BATCHES = 20


def file_safe(name: str) -> str:
  """``name`` with every character but letters, digits, ``.``, ``_`` and ``-`` replaced by ``_``,
  and no leading dot: a task named ``"../x"`` or ``"a/b"`` cannot write outside the study."""
  safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
  return "_" + safe[1:] if safe.startswith(".") else safe


@dataclasses.dataclass(frozen=True)
class Cell:
  """One compiled program of the study: every learning rate and seed of one combination."""

  task: Task
  strategy: Strategy
  optimizer: str
  placement: str
  multiplier: float
  lrs: tuple[float, ...]
  seeds: int
  steps: int

  @property
  def sweep(self) -> bool:
    return self.multiplier != 1.0

  @property
  def name(self) -> str:
    """A file-name-safe identifier, unique within a study (task names are unique in one)."""
    strategy = self.strategy.name.replace("+", "-")
    suffix = f"-x{self.multiplier:g}" if self.sweep else ""
    return f"{file_safe(self.task.name)}__{self.optimizer}__{strategy}{suffix}__{self.placement}"

  @property
  def program(self) -> tuple:
    """What determines the cell's numbers: cells with the same program are computed once (the
    baseline's runs are the same in either placement)."""
    placement = None if self.strategy.baseline else self.placement
    return (self.task.name, self.strategy.name, self.optimizer, placement, self.multiplier)

  def runs(self) -> tuple[np.ndarray, np.ndarray]:
    """The learning rate and seed of each run, learning rate major."""
    lr, seed = np.meshgrid(np.asarray(self.lrs, np.float32), np.arange(self.seeds), indexing="ij")
    return lr.ravel(), seed.ravel().astype(np.int32)


@dataclasses.dataclass
class CellResult:
  """What a cell produced: its per-step curves (arrays of shape [runs, steps]; ``lr``, ``seed``
  and ``eval_loss`` of shape [runs]) and the seconds its runs took, compile excluded."""

  curves: dict[str, np.ndarray]
  seconds: float


def _global_norm(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def _norm_probe() -> optax.GradientTransformation:
  """Passes updates through and keeps their global norm in its state: what the clip sees."""

  def init(params):
    del params
    return {"probe_norm": jnp.zeros((), jnp.float32)}

  def update(updates, state, params=None):
    del state, params
    return updates, {"probe_norm": _global_norm(updates)}

  return optax.GradientTransformation(init, update)


def _find(tree, key):
  """The first dict entry named ``key`` in an optimizer state."""
  holds = lambda node: isinstance(node, dict) and key in node
  return next(node[key] for node in jax.tree.leaves(tree, is_leaf=holds) if holds(node))


def _chain(cell: Cell, calibration: Calibration | None) -> optax.GradientTransformation:
  return cell.strategy.transform(
    cell.optimizer, cell.placement, calibration, cell.multiplier, _norm_probe()
  )


def _step_statistics(state, strategy: Strategy) -> dict[str, jax.Array]:
  stats = clipchain.stats(state)
  clipped = [v for k, v in stats.items() if k.endswith("/clipped_fraction")]
  skipped = [v for k, v in stats.items() if k.endswith("/skipped")]
  thresholds = [v for k, v in stats.items() if k.endswith("/threshold")]
  nan = jnp.full((), jnp.nan, jnp.float32)
  return {
    "clipped": (clipped[0] > 0) if clipped else jnp.zeros((), bool),
    "skipped": jnp.any(jnp.stack(skipped) > 0) if skipped else jnp.zeros((), bool),
    "threshold": (
      thresholds[0].astype(jnp.float32) if strategy.global_threshold and thresholds else nan
    ),
  }


def _run_fn(cell: Cell, calibration: Calibration) -> Callable:
  chain = _chain(cell, calibration)
  task = cell.task

  def run(lr, seed):
    init_key, data_key, eval_key = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = task.init(init_key)
    state = chain.init(params)

    def step(carry, t):
      params, state = carry
      loss, grads = jax.value_and_grad(task.loss)(params, task.batches(data_key, t))
      direction, state = chain.update(grads, state, params)
      params = optax.apply_updates(params, jax.tree.map(lambda d: -lr * d, direction))
      curves = {"loss": loss.astype(jnp.float32), "norm": _find(state, "probe_norm")}
      curves.update(_step_statistics(state, cell.strategy))
      return (params, state), curves

    (params, _), curves = jax.lax.scan(step, (params, state), jnp.arange(cell.steps))
    if task.eval_batch is not None:
      eval_loss = task.loss(params, task.eval_batch(eval_key)).astype(jnp.float32)
    else:
      eval_loss = jnp.full((), jnp.nan, jnp.float32)
    return curves, eval_loss

  return run


def calibrate(task: Task, optimizer: str, placement: str) -> Calibration:
  """Measures what the clip will see over ``WARMUP_BATCHES`` batches at seed 0's initial params.

  Before the optimizer that is the gradient; after it, the optimizer's first update direction
  from a fresh state. Returns the medians over the batches (see :class:`Calibration`); leaves and
  values whose gradient is exactly zero are left out of the per-leaf median and the percentile.
  """
  init_key, data_key, _ = jax.random.split(jax.random.PRNGKey(0), 3)
  params = task.init(init_key)
  direction = OPTIMIZERS[optimizer]()

  @jax.jit
  def measure(t):
    grads = jax.grad(task.loss)(params, task.batches(data_key, t))
    seen = grads
    if placement == "after":
      seen, _ = direction.update(grads, direction.init(params), params)
    leaves = [x.astype(jnp.float32) for x in jax.tree.leaves(seen)]
    leaf_norms = jnp.stack([jnp.sqrt(jnp.sum(jnp.square(x))) for x in leaves])
    values = jnp.concatenate([jnp.abs(x).ravel() for x in leaves])
    # Leaves and values whose gradient is exactly zero at initialisation (behind a zero-initialised
    # readout, say) say nothing about the scale of training: they are left out of the medians.
    nonzero = lambda x: jnp.where(x > 0, x, jnp.nan)
    subset = jax.tree.map(
      lambda keep, x: x if keep else jnp.zeros(()), not_orthogonalised(seen), seen
    )
    return (
      _global_norm(seen),
      jnp.nanmedian(nonzero(leaf_norms)),
      jnp.nanpercentile(nonzero(values), 99.0),
      _global_norm(subset),
    )

  measured = np.array([jax.device_get(measure(t)) for t in range(WARMUP_BATCHES)], np.float64)
  medians = np.median(measured, axis=0)
  # The subset's norm may be zero (a task of matrices only): the subset clip then has nothing to do.
  if not np.all(np.isfinite(medians)) or np.any(medians[:3] <= 0):
    raise ValueError(
      f"Task {task.name!r}: the warm-up gradients are not finite and positive "
      f"(median global norm, leaf norm, 99th percentile, norm of the leaves Muon does not "
      f"orthogonalise: {medians.tolist()})."
    )
  return Calibration(*(float(m) for m in medians))


def _mesh() -> Mesh:
  return Mesh(np.array(jax.devices()), ("runs",))


def _pad(values: np.ndarray, size: int) -> np.ndarray:
  return np.concatenate([values, np.repeat(values[-1:], size - len(values))])


def lanes() -> int:
  """How many runs one device computes at once, ``vmap``-ped: 1 on CPU, 32 on accelerators.

  A run's numbers depend on how many runs are vectorised with it (XLA picks kernels by batch
  size, and the last bits of a float32 sum move), but not on how many devices there are, so runs
  are grouped in fixed-width groups whatever the device count: 8 devices give bit-identical results
  to one. On CPU a group of one is as fast as vectorising ten runs (measured: 2.2 s for ten
  600-step runs of ``rnn-adding`` either way) and compiles faster.
  """
  return 1 if jax.default_backend() == "cpu" else 32


def lower_cell(cell: Cell, calibration: Calibration):
  """Traces a cell for every device; returns ``(lowered, padded run count)``.

  The runs are sharded across every device (``shard_map`` over a one-axis mesh). On each device
  they are computed in groups of :func:`lanes` runs, ``vmap``-ped, one group after the other
  (``lax.map``). The batch is padded (the last run repeated) to fill every group on every device;
  the padding is dropped from the results.
  """
  mesh = _mesh()
  width = lanes()
  lr, _ = cell.runs()
  padded = math.ceil(len(lr) / (mesh.size * width)) * mesh.size * width
  run = jax.vmap(_run_fn(cell, calibration))

  def on_device(lrs, seeds):
    groups = lax.map(lambda group: run(*group), (lrs.reshape(-1, width), seeds.reshape(-1, width)))
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), groups)

  # Every run is computed where its inputs are, with no collective: there is nothing for the
  # varying-axes check to catch, and a task's scan carries would each need a pcast without it.
  sharded = jax.shard_map(
    on_device, mesh=mesh, in_specs=P("runs"), out_specs=P("runs"), check_vma=False
  )
  sharding = NamedSharding(mesh, P("runs"))
  shapes = (
    jax.ShapeDtypeStruct((padded,), jnp.float32, sharding=sharding),
    jax.ShapeDtypeStruct((padded,), jnp.int32, sharding=sharding),
  )
  return jax.jit(sharded).lower(*shapes), padded


def compile_cell(cell: Cell, calibration: Calibration):
  """Lowers and compiles a cell; returns ``(executable, padded run count)``."""
  lowered, padded = lower_cell(cell, calibration)
  return lowered.compile(), padded


def _global_input(values: np.ndarray, sharding: NamedSharding) -> jax.Array:
  return jax.make_array_from_callback(values.shape, sharding, lambda index: values[index])


def execute_cell(cell: Cell, calibration: Calibration, compiled, padded: int) -> CellResult:
  """Runs a compiled cell; returns its curves (see :class:`CellResult`)."""
  lr, seed = cell.runs()
  sharding = NamedSharding(_mesh(), P("runs"))
  inputs = (_global_input(_pad(lr, padded), sharding), _global_input(_pad(seed, padded), sharding))
  start = time.perf_counter()
  curves, eval_loss = jax.block_until_ready(compiled(*inputs))
  seconds = time.perf_counter() - start
  if jax.process_count() > 1:
    curves, eval_loss = multihost_utils.process_allgather((curves, eval_loss), tiled=True)
  curves = {k: np.asarray(v)[: len(lr)] for k, v in curves.items()}
  curves["lr"], curves["seed"] = lr, seed
  curves["eval_loss"] = np.asarray(eval_loss)[: len(lr)]
  return CellResult(curves, seconds)


def records_of(
  cell: Cell,
  calibration: Calibration | None,
  result: CellResult,
  baseline: CellResult | None,
) -> list[RunRecord]:
  """One :class:`RunRecord` per run of a cell, learning rate major.

  ``baseline`` is the unclipped cell with the same task, optimizer and learning rates (None when
  none was run): the runs' ``step_cost`` and ``over_clipped`` are measured against its runs.
  """
  curves = result.curves
  # The learning rates as given, not their float32 copies in the curves.
  runs = [(lr, seed) for lr in cell.lrs for seed in range(cell.seeds)]
  value = cell.strategy.threshold(calibration, cell.multiplier) if calibration else None
  threshold = Threshold(cell.strategy.rule, value, cell.multiplier if cell.strategy.fixed else None)
  records = []
  for i, (lr, seed) in enumerate(runs):
    loss = curves["loss"][i]
    initial, final = metrics.finite_or_none(loss[0]), metrics.final_loss(loss)
    clipped = float(np.mean(curves["clipped"][i]))
    over = False
    if baseline is not None and not cell.strategy.baseline:
      reference = baseline.curves["loss"][i]
      over = metrics.over_clipped(
        clipped, initial, final, metrics.final_loss(reference), metrics.diverged(reference)
      )
    records.append(
      RunRecord(
        task=cell.task.name,
        strategy=cell.strategy.name,
        placement=cell.placement,
        optimizer=cell.optimizer,
        lr=float(lr),
        seed=int(seed),
        threshold=threshold,
        sweep=cell.sweep,
        steps=cell.steps,
        initial_loss=initial,
        final_loss=final,
        best_loss=metrics.best_loss(loss),
        eval_loss=metrics.finite_or_none(curves["eval_loss"][i]),
        diverged=metrics.diverged(loss),
        steps_to_target=metrics.steps_to_target(loss, cell.task.target_loss),
        spike_count=metrics.spike_count(loss),
        clipped_fraction=clipped,
        over_clipped=over,
        skipped_steps=int(np.sum(curves["skipped"][i])),
        steps_per_second=cell.steps * len(runs) / result.seconds if result.seconds > 0 else None,
        step_cost=None if baseline is None else result.seconds / baseline.seconds,
        curves=CurvesRef(f"curves/{cell.name}.npz", i),
      )
    )
  return records


def cells_for(
  task: Task,
  *,
  strategies: Sequence[Strategy],
  optimizers: Sequence[str],
  placements: Sequence[str],
  lrs: dict[str, tuple[float, ...]],
  seeds: int,
  steps: int,
  sweep: Sequence[float],
) -> list[Cell]:
  """Every cell of a task, the baseline first in each (optimizer, placement) so that costs compare
  with it."""
  cells = []
  ordered = sorted(strategies, key=lambda s: not s.baseline)
  for optimizer in optimizers:
    for placement in placements:
      for strategy in ordered:
        multipliers: tuple[float, ...] = (1.0,)
        if strategy.swept and placement == "before":
          multipliers = tuple(sorted(set(sweep) | {1.0}))
        if not strategy.applies(optimizer, placement):
          continue
        for m in multipliers:
          cells.append(Cell(task, strategy, optimizer, placement, m, lrs[optimizer], seeds, steps))
  return cells


def fingerprint(task: Task) -> str:
  """What a task's numbers depend on, hashed: ``--resume`` reuses a cell only when it matches.

  Its settings (name, target, grids, steps, description), its parameters' shapes and dtypes, and
  the loss of seed 0's initial parameters on its first batch, which changes when the model, the loss
  or the data do, even under the same name.
  """
  init_key, data_key, _ = jax.random.split(jax.random.PRNGKey(0), 3)

  @jax.jit
  def first_loss():
    params = task.init(init_key)
    return task.loss(params, task.batches(data_key, jnp.int32(0))).astype(jnp.float32)

  shapes = jax.eval_shape(task.init, init_key)
  spec = {
    "name": task.name,
    "target_loss": task.target_loss,
    "lrs": {k: list(v) for k, v in sorted(task.lrs.items())},
    "steps": task.steps,
    "description": task.description,
    "params": str(jax.tree.map(lambda x: (x.shape, str(x.dtype)), shapes)),
    "first_loss": float(np.asarray(first_loss())).hex(),
  }
  return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

"""What ``clipchain study`` trains: a model, its loss and its data, as three functions."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Params = Any
Batch = Any


@dataclasses.dataclass(frozen=True)
class Task:
  """A training problem the study can run: the built-in tasks are defined through it too.

  Every function is traced once and ``vmap``-ped over runs, so each must be pure JAX: no Python
  control flow on traced values, no host calls.

  Attributes:
    name: Shown in the report and in ``results.json``.
    init: ``init(key) -> params``, the initial parameters (any pytree of float arrays).
    loss: ``loss(params, batch) -> scalar``, the training loss of one batch. Its value is what the
      study reports and judges (spikes, divergence); its gradient is what trains.
    batches: ``batches(key, step) -> batch``, the batch of a step (``step`` a traced int32); the
      same key and step always give the same batch, so every strategy sees the same data. Checked
      before a study trains (:func:`check_batches`).
    eval_batch: ``eval_batch(key) -> batch``, a held-out batch whose ``loss`` is reported as
      ``eval_loss`` after training (e.g. clean targets where the training labels are noisy); None
      when the task has none.
    target_loss: The training loss that counts as learned, for ``steps_to_target``; None for none.
    lrs: The default learning-rate grid of each optimizer (``{"adam": (1e-3, ...), ...}``), from
      stable to unstable; optimizers not named use :data:`clipchain.study.strategies.DEFAULT_LRS`.
    steps: The default number of training steps.
    description: One sentence for the report: what is learned, and what makes it unstable.
  """

  name: str
  init: Callable[[jax.Array], Params]
  loss: Callable[[Params, Batch], jax.Array]
  batches: Callable[[jax.Array, jax.Array], Batch]
  eval_batch: Callable[[jax.Array], Batch] | None = None
  target_loss: float | None = None
  lrs: Mapping[str, Sequence[float]] = dataclasses.field(default_factory=dict)
  steps: int = 300
  description: str = ""

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise TypeError(f"Task name must be a non-empty string, got {self.name!r}.")
    for field in ("init", "loss", "batches"):
      if not callable(getattr(self, field)):
        raise TypeError(f"Task {field} must be callable, got {getattr(self, field)!r}.")
    if self.eval_batch is not None and not callable(self.eval_batch):
      raise TypeError(f"Task eval_batch must be callable or None, got {self.eval_batch!r}.")
    if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
      raise ValueError(f"Task steps must be a positive int, got {self.steps!r}.")


def _leaves_equal(a, b) -> bool:
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(leaves_a) == len(leaves_b) and all(
    np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True) for x, y in zip(leaves_a, leaves_b)
  )


def check_batches(task: Task, steps: int) -> None:
  """Refuses a task whose ``batches`` is not a pure JAX function of ``(key, step)``.

  The study traces ``batches`` once, inside a ``lax.scan`` over a traced step, and calls it again
  for the warm-up: a Python iterator behind it would give every step the batch of the trace, and an
  array indexed by ``step`` past its end would silently repeat its last batch (JAX clamps indices).
  Both are caught here, before anything is trained.

  Raises:
    TypeError: ``batches`` fails on a traced step, or gives different batches for the same key and
      step.
    ValueError: It gives the same batch for the last two steps of the run while its first two
      differ (an array indexed past its end).
  """
  key = jax.random.PRNGKey(0)
  where = f"Task {task.name!r}: batches(key, step) must be a pure JAX function of (key, step)"
  try:
    traced = jax.jit(task.batches)
    first, second = traced(key, jnp.int32(0)), traced(key, jnp.int32(1))
    # Called eagerly twice: Python state behind the function shows as two different batches
    # (a jitted function is traced once, so calling it again proves nothing).
    eager, again = task.batches(key, jnp.int32(0)), task.batches(key, jnp.int32(0))
  except StopIteration:
    raise TypeError(
      f"{where}; it raised StopIteration (a Python iterator or generator behind it?). Index "
      "arrays by step, or generate the batch from jax.random.fold_in(key, step)."
    ) from None
  except Exception as error:
    raise TypeError(
      f"{where}; on a traced step it raised {type(error).__name__}: {error}"
    ) from None
  if not _leaves_equal(eager, again):
    raise TypeError(
      f"{where}; two calls with the same key and step 0 gave different batches (Python state, "
      "such as an iterator or a counter, behind it?)."
    )
  if steps >= 4 and not _leaves_equal(first, second):
    last, before_last = traced(key, jnp.int32(steps - 1)), traced(key, jnp.int32(steps - 2))
    if _leaves_equal(last, before_last):
      raise ValueError(
        f"Task {task.name!r}: batches gives different batches at steps 0 and 1 but the same at "
        f"steps {steps - 2} and {steps - 1}, the last of the run: does it index an array past its "
        "end? JAX clamps an index out of range to the last entry. Give it at least as many batches "
        "as steps, or index them modulo their count."
      )

"""What ``clipchain study`` trains: a model, its loss and its data, as three functions."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

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
    loss: ``loss(params, batch) -> scalar``, the training loss of one batch.
    batches: ``batches(key, step) -> batch``, the batch of a step (``step`` a traced int32); the
      same key and step always give the same batch, so every strategy sees the same data.
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

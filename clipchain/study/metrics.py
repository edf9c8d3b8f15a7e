"""The numbers the study reports for one run, computed from its per-step curves.

Each rule is written here once and documented in ``docs/study.md``; the report, ``results.json``
and the tests all use these functions.
"""

from __future__ import annotations

import math

import numpy as np

#: The share of the last steps whose mean training loss is the run's ``final_loss``.
FINAL_FRACTION = 0.1
#: A run has diverged when its training loss becomes non-finite, or when its final loss is above
#: this multiple of its initial loss (the loss of the first batch, before any update).
DIVERGENCE_FACTOR = 2.0
#: ``steps_to_target`` is the first step whose trailing mean loss over this many steps is at or
#: below the task's target.
TARGET_WINDOW = 10
#: A loss spike starts at a step whose loss is above ``SPIKE_FACTOR`` times the median loss of the
#: ``SPIKE_WINDOW`` steps before it; consecutive spiking steps count once.
SPIKE_WINDOW = 20
SPIKE_FACTOR = 2.0


def finite_or_none(value) -> float | None:
  """``value`` as a Python float, or None when it is NaN or infinite (JSON has no such numbers)."""
  value = float(value)
  return value if math.isfinite(value) else None


def final_loss(loss: np.ndarray) -> float | None:
  """Mean training loss over the last 10 % of steps (at least one); None when not finite."""
  loss = np.asarray(loss, np.float64)
  tail = max(1, math.ceil(FINAL_FRACTION * loss.size))
  return finite_or_none(np.mean(loss[-tail:]))


def best_loss(loss: np.ndarray) -> float | None:
  """The lowest finite training loss of the run; None when there is none."""
  loss = np.asarray(loss, np.float64)
  finite = loss[np.isfinite(loss)]
  return finite_or_none(finite.min()) if finite.size else None


def diverged(loss: np.ndarray) -> bool:
  """Non-finite anywhere, or a final loss above ``DIVERGENCE_FACTOR`` x the initial loss."""
  loss = np.asarray(loss, np.float64)
  if not np.all(np.isfinite(loss)):
    return True
  final = final_loss(loss)
  return bool(final is None or final > DIVERGENCE_FACTOR * loss[0])


def steps_to_target(loss: np.ndarray, target: float | None) -> int | None:
  """The first step (0-based) ending a ``TARGET_WINDOW``-step window whose mean is <= ``target``.

  None when the task has no target or the run never reaches it.
  """
  if target is None:
    return None
  loss = np.asarray(loss, np.float64)
  if loss.size < TARGET_WINDOW:
    return None
  windows = np.convolve(loss, np.ones(TARGET_WINDOW) / TARGET_WINDOW, mode="valid")
  hits = np.flatnonzero(np.isfinite(windows) & (windows <= target))
  return int(hits[0]) + TARGET_WINDOW - 1 if hits.size else None


def spike_count(loss: np.ndarray) -> int:
  """How many loss spikes start in the run (see ``SPIKE_WINDOW`` and ``SPIKE_FACTOR``).

  A non-finite loss counts as a spike when the window before it is finite; a step whose window holds
  a non-finite loss is not judged.
  """
  loss = np.asarray(loss, np.float64)
  count, spiking = 0, False
  for t in range(SPIKE_WINDOW, loss.size):
    window = loss[t - SPIKE_WINDOW : t]
    if not np.all(np.isfinite(window)):
      spiking = False
      continue
    now = not np.isfinite(loss[t]) or loss[t] > SPIKE_FACTOR * np.median(window)
    count += now and not spiking
    spiking = now
  return int(count)

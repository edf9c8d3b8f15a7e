"""The numbers the study reports for one run, computed from its per-step curves.

Each rule is written here once and documented in ``docs/study.md``; the report, ``results.json``
and the tests all use these functions. Every rule holds for any loss, positive, zero or negative:
none divides by the loss or compares it with a multiple of itself.
"""

from __future__ import annotations

import math

import numpy as np

#: The share of the last steps whose mean training loss is the run's ``final_loss``.
FINAL_FRACTION = 0.1
#: A run has diverged when its training loss becomes non-finite, or when its final loss is above
#: its initial loss (the loss of the first batch, before any update) by more than
#: ``DIVERGENCE_FACTOR - 1`` times the initial loss's magnitude: for a positive loss, a final loss
#: above ``DIVERGENCE_FACTOR`` x the initial one.
DIVERGENCE_FACTOR = 2.0
#: ``steps_to_target`` is the first step whose trailing mean loss over this many steps is at or
#: below the task's target.
TARGET_WINDOW = 10
#: A loss spike starts at a step whose loss rises above the median of the ``SPIKE_WINDOW`` steps
#: before it by more than ``SPIKE_SIGMAS`` robust standard deviations of those steps (1.4826 x their
#: median absolute deviation) *and* by more than ``SPIKE_FLOOR`` x the run's progress so far (its
#: initial loss minus the lowest loss before the step; at least ``SPIKE_MIN_SCALE`` x the initial
#: loss's magnitude, so that a run that has not moved does not count rounding). The spread keeps
#: batch noise from counting; the floor keeps a run whose loss has settled (spread near zero) from
#: counting its last bits of noise. Both are unchanged when a constant is added to the loss.
SPIKE_WINDOW = 20
SPIKE_SIGMAS = 6.0
SPIKE_FLOOR = 0.1
SPIKE_MIN_SCALE = 1e-3
#: A clipped run is over-clipped when its clip changed the update on at least this share of steps
#: and its final loss is above the unclipped run's (same task, optimizer, learning rate and seed)
#: by more than ``OVERCLIP_MARGIN`` x the unclipped run's progress (its initial minus final loss).
OVERCLIP_FRACTION = 0.9
OVERCLIP_MARGIN = 0.1


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
  """Non-finite anywhere, or a final loss above the initial one by more than
  ``DIVERGENCE_FACTOR - 1`` x ``|initial loss|`` (see :data:`DIVERGENCE_FACTOR`)."""
  loss = np.asarray(loss, np.float64)
  if loss.size == 0:
    return False
  if not np.all(np.isfinite(loss)):
    return True
  final = final_loss(loss)
  initial = float(loss[0])
  return bool(final is None or final - initial > (DIVERGENCE_FACTOR - 1.0) * abs(initial))


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


def spike_steps(loss: np.ndarray) -> np.ndarray:
  """Whether each step is spiking (see :data:`SPIKE_WINDOW`), as a bool array of the loss's shape.

  A non-finite loss after a finite window is spiking; a step whose window holds a non-finite loss,
  and the first ``SPIKE_WINDOW`` steps, are not judged (False).
  """
  loss = np.asarray(loss, np.float64)
  spiking = np.zeros(loss.shape, bool)
  if loss.size <= SPIKE_WINDOW or not np.isfinite(loss[0]):
    return spiking
  initial = loss[0]
  # The lowest finite loss before each step: the progress the run has made when it is judged.
  lowest = np.minimum.accumulate(np.where(np.isfinite(loss), loss, np.inf))
  for t in range(SPIKE_WINDOW, loss.size):
    window = loss[t - SPIKE_WINDOW : t]
    if not np.all(np.isfinite(window)):
      continue
    if not np.isfinite(loss[t]):
      spiking[t] = True
      continue
    median = np.median(window)
    spread = 1.4826 * np.median(np.abs(window - median))
    scale = max(initial - lowest[t - 1], SPIKE_MIN_SCALE * abs(initial))
    rise = loss[t] - median
    spiking[t] = rise > SPIKE_SIGMAS * spread and rise > SPIKE_FLOOR * scale
  return spiking


def spike_count(loss: np.ndarray) -> int:
  """How many loss spikes start in the run: consecutive spiking steps (:func:`spike_steps`) count
  once."""
  spiking = spike_steps(loss)
  onsets = spiking & ~np.concatenate([[False], spiking[:-1]])
  return int(np.sum(onsets))


def over_clipped(
  clipped_fraction: float,
  initial: float | None,
  final: float | None,
  unclipped_final: float | None,
  unclipped_diverged: bool,
) -> bool:
  """Whether a clipped run was over-clipped (see :data:`OVERCLIP_FRACTION`).

  Args:
    clipped_fraction: The share of the run's steps on which its clip changed the update.
    initial: The run's initial loss.
    final: The run's final loss (None when it diverged to a non-finite loss).
    unclipped_final: The final loss of the unclipped run at the same task, optimizer, learning
      rate and seed; None when it has none.
    unclipped_diverged: Whether that unclipped run diverged: a clip cannot be over-clipped next to
      a run that did not train.
  """
  if clipped_fraction < OVERCLIP_FRACTION or unclipped_diverged:
    return False
  if final is None or unclipped_final is None or initial is None:
    return False
  progress = initial - unclipped_final
  return bool(progress > 0 and final - unclipped_final > OVERCLIP_MARGIN * progress)

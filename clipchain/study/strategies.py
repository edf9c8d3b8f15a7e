"""The strategies and optimizers a study compares, and how each fixed threshold is chosen.

A strategy is a clipchain transform built from :class:`Calibration`, numbers measured the way a
user would measure them before picking a fixed threshold: on a short warm-up of 20 batches at the
initial parameters, the median global norm, the median per-leaf norm and the median 99th
percentile of the absolute values (these two over the leaves and values that are not exactly
zero), of what the clip will see (the gradient when it is placed
before the optimizer, the optimizer's first update when it is placed after it). Adaptive strategies
use their published defaults, except where a default is itself a fixed norm in the units of the
paper's model (ZClip's cap of 1.0, AdaGC's warm-up clip at 1.0): those take the warm-up median too,
so that every strategy is compared at the scale of the task at hand.

An optimizer is split into its *direction* (the optimizer without its learning rate) and the final
``-lr`` scale, so that runs differing only by learning rate are one compiled program (the learning
rate a traced value) and a clip placed *after* the optimizer sees the update in units of the
learning rate: clipping the direction at ``c`` is clipping the applied update at ``lr * c``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import optax

import clipchain

PLACEMENTS = ("before", "after")
"""Where a clip sits in the chain: ``"before"`` the optimizer or ``"after"`` it."""

#: Multiples of the warm-up median tried by the fixed global clip's threshold sweep.
SWEEP_MULTIPLIERS = (0.25, 1.0, 4.0)


@dataclasses.dataclass(frozen=True)
class Calibration:
  """What a warm-up measured on what the clip will see (see the module docstring)."""

  global_norm: float
  layer_norm: float
  abs_p99: float
  #: The median global norm of the leaves Muon does not orthogonalise (:func:`not_orthogonalised`).
  subset_norm: float


@dataclasses.dataclass(frozen=True)
class Strategy:
  """A named clipping strategy: how it is built, and how its threshold was chosen."""

  name: str
  build: Callable[[Calibration, float], optax.GradientTransformation]
  rule: str
  fixed: bool
  #: One threshold for the whole tree, comparable with the global norm (plotted over time).
  global_threshold: bool = False
  #: Wraps the optimizer (a guard) instead of sitting beside it.
  guard: bool = False
  #: Built from the warm-up's :class:`Calibration` (every fixed threshold, and adaptive ones that
  #: start from or fall back to the warm-up median); the others never run the warm-up.
  calibrated: bool = False
  #: Clips the optimizer's update relative to its own state, so it wraps the optimizer: it is
  #: update clipping by nature and runs in placement "after" only.
  wraps_optimizer: bool = False
  #: The optimizers it applies to (None: all).
  optimizers: tuple[str, ...] | None = None
  #: The :class:`Calibration` field a fixed threshold is a multiple of (what ``build`` scales).
  scale_of: str = "global_norm"
  #: The unclipped reference every other strategy is compared with (``none``): one per study, its
  #: runs the same in either placement.
  baseline: bool = False
  #: Its fixed threshold is also run at the multiples of :data:`SWEEP_MULTIPLIERS` (placement
  #: before), for the report's threshold sweep.
  swept: bool = False

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise TypeError(f"Strategy name must be a non-empty string, got {self.name!r}.")
    if not callable(self.build):
      raise TypeError(f"Strategy {self.name!r}: build must be callable, got {self.build!r}.")
    if self.fixed:
      object.__setattr__(self, "calibrated", True)

  def describe(self) -> dict:
    """What the report needs to know of the strategy (``results.json``'s ``meta["strategies"]``)."""
    return {
      "rule": self.rule,
      "baseline": self.baseline,
      "fixed": self.fixed,
      "global_threshold": self.global_threshold,
      "swept": self.swept,
    }

  def applies(self, optimizer: str, placement: str) -> bool:
    """Whether the strategy is run with ``optimizer`` in ``placement`` (see the attributes)."""
    if self.optimizers is not None and optimizer not in self.optimizers:
      return False
    return not (self.wraps_optimizer and placement != "after")

  def transform(
    self,
    optimizer: str,
    placement: str,
    calibration: Calibration | None,
    multiplier: float = 1.0,
    probe: optax.GradientTransformation | None = None,
  ) -> optax.GradientTransformation:
    """The chain a run applies before its ``-lr`` scale: the clip, placed, around the direction.

    ``probe``, when given, is put right where the clip reads its input (first for a clip before the
    optimizer, after the direction for one after it), to record what the clip sees.
    """
    direction = OPTIMIZERS[optimizer]()
    seen = [] if probe is None else [probe]
    if self.wraps_optimizer:
      # Update clipping relative to the optimizer's own state: it wraps the direction (and reads
      # its b2 from it).
      return clipchain.clip_by_second_moment(optax.chain(direction, *seen))
    clip = self.build(calibration, multiplier)  # type: ignore[arg-type]  # None: not calibrated
    if placement == "before":
      chain = optax.chain(*seen, clip, direction)
    else:
      chain = optax.chain(direction, *seen, clip)
    if self.guard:
      chain = clipchain.skip_spikes(clipchain.skip_nonfinite(chain))
    return chain

  def threshold(self, calibration: Calibration, multiplier: float) -> float | None:
    """The fixed threshold this strategy uses, or None for an adaptive one."""
    if not self.fixed:
      return None
    return getattr(calibration, self.scale_of) * multiplier


@dataclasses.dataclass(frozen=True)
class PaperComparison:
  """A published claim about strategies that the study tests in miniature, where it runs them.

  Attributes:
    title: The method and paper, for the report's heading.
    claim: What the paper found, in one sentence.
    ordering: Strategy names, best first: each should have no more diverged runs, and no more
      spikes per run, than the next, at the learning rates where the last one is unstable.
    optimizers: The optimizers the claim is about.
    placement: Where the clips sit.
  """

  title: str
  claim: str
  ordering: tuple[str, ...]
  optimizers: tuple[str, ...]
  placement: str = "before"

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


PAPER_COMPARISONS = (
  PaperComparison(
    title="ZClip (Kumar et al. 2025)",
    claim="On a 1B LLaMA trained with AdamW at lr 3e-3, training without clipping and with a fixed "
    "global-norm clip diverged, and ZClip's z-score clip did not; at every learning rate ZClip had "
    "the fewest loss spikes.",
    ordering=("zclip", "global", "none"),
    optimizers=("adam", "adamw"),
  ),
)
"""The published orderings the report checks (see :class:`PaperComparison`)."""


def not_orthogonalised(tree):
  """The leaves ``optax.contrib.muon`` gives its AdamW (every one that is not a matrix): the mask
  of the subset clip."""
  return jax.tree.map(lambda x: x.ndim != 2, tree)


def _identity(calibration: Calibration, multiplier: float) -> optax.GradientTransformation:
  del calibration, multiplier
  return optax.identity()


STRATEGIES: dict[str, Strategy] = {
  s.name: s
  for s in (
    Strategy("none", _identity, "no clipping", fixed=False, baseline=True),
    Strategy(
      "value",
      lambda c, m: clipchain.clip(c.abs_p99 * m),
      "clip each value at the warm-up median of the 99th percentile of |g|",
      fixed=True,
      scale_of="abs_p99",
    ),
    Strategy(
      "global",
      lambda c, m: clipchain.clip_by_global_norm(c.global_norm * m),
      "clip the global norm at the warm-up median global norm",
      fixed=True,
      global_threshold=True,
      swept=True,
    ),
    Strategy(
      "layer",
      lambda c, m: clipchain.clip_by_layer_norm(c.layer_norm * m),
      "clip each leaf's norm at the warm-up median of the per-leaf norms",
      fixed=True,
      scale_of="layer_norm",
    ),
    Strategy(
      "unit",
      lambda c, m: clipchain.adaptive_grad_clip(0.01),
      "AGC: each unit's norm at most 0.01 x its parameters' norm (Brock et al. 2021)",
      fixed=False,
    ),
    Strategy(
      "autoclip",
      lambda c, m: clipchain.autoclip(),
      "AutoClip: the 10th percentile of the global norms seen so far (Seetharaman et al. 2020)",
      fixed=False,
      global_threshold=True,
    ),
    Strategy(
      "zclip",
      lambda c, m: clipchain.zclip(max_grad_norm=None),
      "ZClip: z-score of the global norm over its EMA, z > 2.5 (Kumar et al. 2025); no fixed cap",
      fixed=False,
      global_threshold=True,
    ),
    Strategy(
      "quantile",
      lambda c, m: clipchain.quantile_clip(initial_threshold=c.global_norm),
      "tracks the median global norm online (Andrew et al. 2021), starting at the warm-up median",
      fixed=False,
      global_threshold=True,
      calibrated=True,
    ),
    Strategy(
      "adagc",
      lambda c, m: clipchain.adagc(warmup_max_norm=c.global_norm),
      "AdaGC: each leaf at 1.04 x the EMA of its norm (Wang et al. 2025); warm-up clip at the"
      " warm-up median",
      fixed=False,
      calibrated=True,
    ),
    Strategy(
      "spam",
      lambda c, m: clipchain.spam_clip(),
      "SPAM: values whose square exceeds 5000 x their second moment (Huang et al. 2025)",
      fixed=False,
    ),
    Strategy(
      "normalize",
      lambda c, m: clipchain.normalize(c.global_norm * m),
      "set the global norm to the warm-up median global norm (normalised gradient descent)",
      fixed=True,
      global_threshold=True,
    ),
    Strategy(
      "stable-adamw",
      lambda c, m: optax.identity(),
      "StableAdamW: the update of each tensor divided by max(1, RMS(g / sqrt(v_hat))) "
      "(Wortsman et al. 2023); Adam-family optimizers, after only",
      fixed=False,
      wraps_optimizer=True,
      # Adam's bias-corrected second moment; rmsprop's has no bias correction (refused).
      optimizers=("adam", "adamw"),
    ),
    Strategy(
      "stable-spam",
      lambda c, m: clipchain.stable_spam_clip(),
      "Stable-SPAM's AdaClip then AdaGN per tensor (Huang et al. 2025), its defaults",
      fixed=False,
    ),
    Strategy(
      "global-subset",
      lambda c, m: clipchain.clip_by_global_norm(c.subset_norm * m, mask=not_orthogonalised),
      "clip the global norm of the leaves Muon does not orthogonalise (its AdamW's) at their "
      "warm-up median, the orthogonalised ones untouched; Muon only",
      fixed=True,
      optimizers=("muon",),
      scale_of="subset_norm",
    ),
    Strategy(
      "global+skip",
      lambda c, m: clipchain.clip_by_global_norm(c.global_norm * m),
      "the global clip, with non-finite and 6-sigma spike steps skipped",
      fixed=True,
      global_threshold=True,
      guard=True,
    ),
  )
}
"""Every clipping strategy the study knows, by name (see ``docs/study.md``)."""


def _sgd() -> optax.GradientTransformation:
  return optax.trace(decay=0.9)


def _rmsprop() -> optax.GradientTransformation:
  return optax.scale_by_rms(decay=0.9, eps=1e-8)


def _adam() -> optax.GradientTransformation:
  return optax.scale_by_adam()


def _adamw() -> optax.GradientTransformation:
  # optax.adamw's weight decay is added to the direction before the learning rate scales it.
  return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(1e-4))


def _muon() -> optax.GradientTransformation:
  # optax.contrib.muon ends both of its branches (Muon on matrices, AdamW on the rest) by
  # scaling by -lr: at lr 1 that is the direction negated.
  return optax.chain(optax.contrib.muon(1.0), optax.scale(-1.0))


OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
  "sgd": _sgd,
  "rmsprop": _rmsprop,
  "adam": _adam,
  "adamw": _adamw,
  "muon": _muon,
}
"""Each optimizer's direction (the optimizer without its learning rate), as optax builds it.

``optax.sgd(lr, momentum=0.9)``, ``optax.rmsprop(lr)``, ``optax.adam(lr)``,
``optax.adamw(lr, weight_decay=1e-4)``, ``optax.contrib.muon(lr)`` (Newton-Schulz orthogonalised
momentum on every matrix, AdamW at the same learning rate on the other leaves).
"""

DEFAULT_LRS: dict[str, tuple[float, ...]] = {
  "sgd": (0.01, 0.03, 0.1, 0.3, 1.0),
  "rmsprop": (1e-4, 1e-3, 1e-2, 3e-2, 1e-1),
  "adam": (1e-4, 1e-3, 1e-2, 3e-2, 1e-1),
  "adamw": (1e-4, 1e-3, 1e-2, 3e-2, 1e-1),
  "muon": (1e-4, 1e-3, 1e-2, 3e-2, 1e-1),
}
"""Learning-rate grids for a task that gives none of its own: log-spaced, stable to unstable."""

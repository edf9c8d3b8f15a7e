"""clipchain: gradient clipping for JAX and optax, correct, observable and fast.

Every transform is an ``optax.GradientTransformation`` built from one core, :func:`clip_norm`,
whose three independent choices are *where* a norm is measured (:mod:`clipchain.granularity`),
*how* the threshold is set (:mod:`clipchain.thresholds`) and *what is done* with it, cap or
normalise (:mod:`clipchain.rules`). Statistics are kept in the state and
collected by :func:`stats`.
"""

from clipchain import attention, granularity, rules, thresholds
from clipchain._src.clip_norm import ClipNormState, clip_norm
from clipchain._src.guards.check import check_guards
from clipchain._src.guards.nonfinite import SkipNonFiniteState, skip_nonfinite
from clipchain._src.guards.spikes import SkipSpikesState, skip_spikes
from clipchain._src.guards.step import guarded_step
from clipchain._src.monitor import MonitorState, monitor
from clipchain._src.per_example import per_example_global_norm_clip, per_example_layer_norm_clip
from clipchain._src.presets.adagc import adagc
from clipchain._src.presets.agc import adaptive_grad_clip
from clipchain._src.presets.autoclip import autoclip
from clipchain._src.presets.basic import (
  clip,
  clip_by_block_rms,
  clip_by_global_norm,
  clip_by_layer_norm,
)
from clipchain._src.presets.normalize import normalize
from clipchain._src.presets.quantile import quantile_clip
from clipchain._src.presets.spam import spam_clip
from clipchain._src.presets.stable_spam import stable_spam_clip
from clipchain._src.presets.zclip import zclip
from clipchain._src.qk_clip import QKClipState, qk_clip
from clipchain._src.second_moment import ClipBySecondMomentState, clip_by_second_moment
from clipchain._src.stats import stats
from clipchain._version import __version__

__all__ = [
  "SkipNonFiniteState",
  "SkipSpikesState",
  "check_guards",
  "guarded_step",
  "skip_nonfinite",
  "skip_spikes",
  "ClipBySecondMomentState",
  "ClipNormState",
  "MonitorState",
  "QKClipState",
  "__version__",
  "adagc",
  "adaptive_grad_clip",
  "attention",
  "autoclip",
  "clip",
  "clip_by_block_rms",
  "clip_by_global_norm",
  "clip_by_layer_norm",
  "clip_by_second_moment",
  "clip_norm",
  "granularity",
  "monitor",
  "normalize",
  "per_example_global_norm_clip",
  "per_example_layer_norm_clip",
  "qk_clip",
  "quantile_clip",
  "rules",
  "spam_clip",
  "stable_spam_clip",
  "stats",
  "thresholds",
  "zclip",
]

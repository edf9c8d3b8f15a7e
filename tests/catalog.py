"""Every public transform, built small, for the tests that must hold for all of them."""

from __future__ import annotations

import optax
from harness import normal_tree

import clipchain
from clipchain import granularity, rules, thresholds

# Each preset called with nothing but its required arguments: what optax.inject_hyperparams sees.
PRESETS = {
  "clip": (clipchain.clip, (1.0,)),
  "clip_by_global_norm": (clipchain.clip_by_global_norm, (1.0,)),
  "clip_by_block_rms": (clipchain.clip_by_block_rms, (1.0,)),
  "clip_by_layer_norm": (clipchain.clip_by_layer_norm, (1.0,)),
  "adaptive_grad_clip": (clipchain.adaptive_grad_clip, (0.01,)),
  "autoclip": (clipchain.autoclip, ()),
  "zclip": (clipchain.zclip, ()),
  "quantile_clip": (clipchain.quantile_clip, ()),
  "adagc": (clipchain.adagc, ()),
  "spam_clip": (clipchain.spam_clip, ()),
  "normalize": (clipchain.normalize, ()),
  "stable_spam_clip": (clipchain.stable_spam_clip, ()),
  "monitor": (clipchain.monitor, ()),
}


def _guarded(*, spikes: bool) -> optax.GradientTransformation:
  inner = clipchain.skip_nonfinite(
    optax.chain(clipchain.clip_by_global_norm(1.0), optax.sgd(0.1)), max_consecutive=3
  )
  return clipchain.skip_spikes(inner, window=4, min_history=2) if spikes else inner


# Every public transform with small warmups and windows, so that a few steps exercise them.
TRANSFORMS = {
  "clip": lambda: clipchain.clip(0.5),
  "clip_by_global_norm": lambda: clipchain.clip_by_global_norm(1.0),
  "clip_by_block_rms": lambda: clipchain.clip_by_block_rms(0.5),
  "clip_by_layer_norm": lambda: clipchain.clip_by_layer_norm(1.0, layers="module"),
  "clip_by_layer_norm_stacked": lambda: clipchain.clip_by_layer_norm(
    1.0, stacked_axes={"kernel": 1}
  ),
  "monitor": lambda: clipchain.monitor(),
  "adaptive_grad_clip": lambda: clipchain.adaptive_grad_clip(0.05),
  "adaptive_grad_clip_stacked": lambda: clipchain.adaptive_grad_clip(
    0.05, stacked_axes={"kernel": 1}
  ),
  "autoclip": lambda: clipchain.autoclip(50.0, window=4),
  "autoclip_layer": lambda: clipchain.autoclip(50.0, window=4, granularity="layer"),
  "zclip": lambda: clipchain.zclip(warmup_steps=2),
  "zclip_layer": lambda: clipchain.zclip(warmup_steps=2, granularity="layer"),
  "zclip_stacked": lambda: clipchain.zclip(
    warmup_steps=2, granularity="layer", stacked_axes={"kernel": 1}
  ),
  "zclip_unit": lambda: clipchain.zclip(warmup_steps=2, granularity="unit"),
  "quantile_clip": lambda: clipchain.quantile_clip(initial_threshold=1.0),
  "quantile_clip_unit": lambda: clipchain.quantile_clip(initial_threshold=1.0, granularity="unit"),
  "adagc": lambda: clipchain.adagc(warmup_steps=1),
  "adagc_unit": lambda: clipchain.adagc(warmup_steps=1, granularity="unit"),
  "spam_clip": lambda: clipchain.spam_clip(warmup_steps=1),
  "spam_clip_layer": lambda: clipchain.spam_clip(warmup_steps=1, granularity="layer"),
  "normalize": lambda: clipchain.normalize(1.0),
  "normalize_layer": lambda: clipchain.normalize(0.5, 0.01, granularity="layer"),
  "stable_spam_clip": lambda: clipchain.stable_spam_clip(theta=0.9),
  "clip_by_second_moment": lambda: clipchain.clip_by_second_moment(optax.adam(0.1), b2=0.999),
  "skip_nonfinite": lambda: _guarded(spikes=False),
  "skip_spikes": lambda: _guarded(spikes=True),
}

# Every policy, for the grid of policy x granularity.
POLICIES = {
  "Fixed": lambda: thresholds.Fixed(1.0),
  "Scheduled": lambda: thresholds.Scheduled(optax.linear_schedule(2.0, 0.5, 4)),
  "RelativeToParams": lambda: thresholds.RelativeToParams(0.5),
  "Percentile": lambda: thresholds.Percentile(50.0, window=3),
  "ZScore": lambda: thresholds.ZScore(warmup_steps=2, z_thresh=1.0, max_grad_norm=None),
  "QuantileTracker": lambda: thresholds.QuantileTracker(0.5, 0.3, 1.0),
  "EMARatio": lambda: thresholds.EMARatio(ratio=1.5, beta=0.5, warmup_steps=1),
  "SecondMoment": lambda: thresholds.SecondMoment(threshold=2.0, beta2=0.5, warmup_steps=1),
  "MaxEMA": lambda: thresholds.MaxEMA(0.5),
  "NormMoments": lambda: thresholds.NormMoments(),
}

# Every granularity, with a stacked axis where it takes one (a leaf path with "stack" in it).
GRANULARITIES = {
  "Global": lambda: granularity.Global(),
  "Layer": lambda: granularity.Layer(stacked_axes={"stack": 1}),
  "Unit": lambda: granularity.Unit(stacked_axes={"stack": 1}),
  "Element": lambda: granularity.Element(),
}

# Every rule.
RULES = {
  "Clip": lambda: rules.Clip(),
  "Rescale": lambda: rules.Rescale(),
  "Normalize": lambda: rules.Normalize(),
}


# A small Flax-like tree: a kernel, a bias and a scalar.
SHAPES = {"dense": {"kernel": (3, 4), "bias": (4,)}, "scale": ()}


def tree(seed: int, scale: float = 1.0):
  """``SHAPES`` filled with float32 ``scale * N(0, 1)`` values."""
  return normal_tree(SHAPES, seed, scale)


def update(tx, grads, state, params, **extra):
  """``tx.update`` with the extra ``loss=`` only where the transform takes it."""
  if isinstance(tx, optax.GradientTransformationExtraArgs):
    return tx.update(grads, state, params, **extra)
  return tx.update(grads, state, params)

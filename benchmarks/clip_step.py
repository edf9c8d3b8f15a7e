"""Cost of clipping inside a jitted optimizer step: step time, compile time, memory, fusions.

Every variant is timed in the same process, on the same inputs, in one round-robin loop, so that
machine noise hits each variant equally. The step is the one a training loop runs::

  def step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  jax.jit(step, donate_argnums=(0, 1))

Each row reports the median step time, its ratio to ``adam`` alone (the median of the ratios of
steps timed in the same round, then the ratio of the medians), the compile time, the number of
fusions in the optimized HLO and XLA's buffer assignment from ``compiled.memory_analysis()``: a
temporary as large as the gradients (``temp / grads`` near 1) is the second gradient-sized buffer
that ``optax.clip_by_global_norm`` creates. ``adam (control)``, a second copy of the baseline,
shows how far apart two identical steps measure.

Usage::

  python benchmarks/clip_step.py                  # every workload, the table to paste in README
  python benchmarks/clip_step.py --quick          # tiny sizes: a smoke run in seconds
  python benchmarks/clip_step.py --workloads large --repeats 200 --json out.json

To add a variant, add one line to ``VARIANTS``: a name and a function returning the transform.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import clipchain

LEARNING_RATE = 1e-3
MAX_NORM = 1.0
BASELINE = "adam"
# A second, identical copy of the baseline: its ratio is the noise floor of the measurement.
CONTROL = "adam (control)"
# Adaptive presets are also compared with the fixed-threshold global clip they build on.
CLIP_REFERENCE = "clipchain clip + adam"
# QK-Clip's threshold; the attention workload's logits put half of the heads above it.
QK_THRESHOLD = 100.0


def _adam() -> optax.GradientTransformation:
  return optax.adam(LEARNING_RATE)


def _muon() -> optax.GradientTransformation:
  return optax.contrib.muon(LEARNING_RATE)


def _not_matrix(tree):
  """The leaves optax.contrib.muon gives its AdamW: every one that is not a matrix."""
  return jax.tree.map(lambda x: x.ndim != 2, tree)


def _scanned(path: str, leaf) -> int:
  """A rank-3 leaf is a stack of layers along its first axis, as ``nn.scan`` makes it."""
  del path
  return 1 if leaf.ndim == 3 else 0


class OwnStep(NamedTuple):
  """A variant that brings its own training step instead of ``tx.update`` + ``apply_updates``."""

  init: Callable[[Any], Any]
  step: Callable[..., tuple[Any, Any]]


def _guarded(guard: optax.GradientTransformation) -> OwnStep:
  """A guard run by ``clipchain.guarded_step``: the update and its application under one cond."""
  return OwnStep(guard.init, clipchain.guarded_step(guard))


def _clipped_adam() -> optax.GradientTransformation:
  return optax.chain(clipchain.clip_by_global_norm(MAX_NORM), _adam())


# Name -> factory of the whole optimizer. Ratios are taken against BASELINE, which always runs.
VARIANTS: dict[str, Callable[[], optax.GradientTransformation | OwnStep]] = {
  "adam": _adam,
  "optax clip + adam": lambda: optax.chain(optax.clip_by_global_norm(MAX_NORM), _adam()),
  "clipchain clip + adam": lambda: optax.chain(clipchain.clip_by_global_norm(MAX_NORM), _adam()),
  # Adaptive thresholds at the global granularity: the target is within 1.1x of CLIP_REFERENCE.
  "autoclip + adam": lambda: optax.chain(clipchain.autoclip(), _adam()),
  "zclip + adam": lambda: optax.chain(clipchain.zclip(), _adam()),
  "quantile_clip + adam": lambda: optax.chain(clipchain.quantile_clip(), _adam()),
  "global adagc + adam": lambda: optax.chain(
    clipchain.clip_norm(clipchain.thresholds.EMARatio(), granularity="global", name="adagc"),
    _adam(),
  ),
  # Per-unit norms against the parameters' (AGC): its floor reads the params once more.
  "optax agc + adam": lambda: optax.chain(optax.adaptive_grad_clip(0.01), _adam()),
  "clipchain agc + adam": lambda: optax.chain(clipchain.adaptive_grad_clip(0.01), _adam()),
  # Value clipping: it can fuse into the optimizer's pass; its statistics need a read.
  "optax value clip + adam": lambda: optax.chain(optax.clip(0.001), _adam()),
  "clipchain value clip + adam": lambda: optax.chain(clipchain.clip(0.001), _adam()),
  # The clipped norm and fraction, opt-in: each a compare or min per value, a pass of its own here.
  "value clip with clip_statistics + adam": lambda: optax.chain(
    clipchain.clip(0.001, clip_statistics=True), _adam()
  ),
  # Per-layer norms: one read of the gradients, as the global clip.
  "optax block rms + adam": lambda: optax.chain(optax.clip_by_block_rms(1.0), _adam()),
  "clipchain block rms + adam": lambda: optax.chain(clipchain.clip_by_block_rms(1.0), _adam()),
  "layer clip + adam": lambda: optax.chain(clipchain.clip_by_layer_norm(1.0), _adam()),
  "layer zclip + adam": lambda: optax.chain(clipchain.zclip(granularity="layer"), _adam()),
  "adagc + adam": lambda: optax.chain(clipchain.adagc(), _adam()),
  # Scanned layers (the "stacked" workload): one group per slice of each rank-3 leaf, still one
  # read of the gradients.
  "scanned layer clip + adam": lambda: optax.chain(
    clipchain.clip_by_layer_norm(1.0, stacked_axes=_scanned), _adam()
  ),
  "scanned layer zclip + adam": lambda: optax.chain(
    clipchain.zclip(granularity="layer", stacked_axes=_scanned), _adam()
  ),
  "scanned agc + adam": lambda: optax.chain(
    clipchain.adaptive_grad_clip(0.01, stacked_axes=_scanned), _adam()
  ),
  # Measuring only: one read of the gradients, no dearer than the clip.
  "monitor + adam": lambda: optax.chain(clipchain.monitor(), _adam()),
  "scanned monitor + adam": lambda: optax.chain(clipchain.monitor(stacked_axes=_scanned), _adam()),
  # SPAM keeps a moment per value: a read and a write of it on top.
  "spam_clip + adam": lambda: optax.chain(clipchain.spam_clip(), _adam()),
  # The normalize rule: one read of the gradients, as a clip. LARS against optax's trust ratio:
  # the gradients and the params are read once more each.
  "normalize + adam": lambda: optax.chain(clipchain.normalize(MAX_NORM), _adam()),
  "optax trust ratio + adam": lambda: optax.chain(optax.scale_by_trust_ratio(0.01), _adam()),
  "clipchain trust ratio + adam": lambda: optax.chain(
    clipchain.clip_norm(
      clipchain.thresholds.RelativeToParams(0.01, eps=0.0), granularity="layer", rule="normalize"
    ),
    _adam(),
  ),
  # Stable-SPAM: a max and a norm per tensor (two reads of the gradients).
  "stable_spam_clip + adam": lambda: optax.chain(clipchain.stable_spam_clip(), _adam()),
  # StableAdamW: the gradient and Adam's new second moment read once more.
  "clip_by_second_moment(adam)": lambda: clipchain.clip_by_second_moment(_adam(), b2=0.999),
  # Muon, and beside it the clip of the leaves it gives its AdamW (mask=): one read of those.
  "muon": lambda: _muon(),
  "subset clip + muon": lambda: optax.chain(
    clipchain.clip_by_global_norm(MAX_NORM, mask=_not_matrix), _muon()
  ),
  # QK-Clip after the step: one elementwise pass over the query and key leaves.
  "qk_clip + adam": lambda: optax.chain(_adam(), clipchain.qk_clip(QK_THRESHOLD)),
  "qk_clip + muon": lambda: optax.chain(_muon(), clipchain.qk_clip(QK_THRESHOLD)),
  # Guards: the cost of the clip they wrap plus scalars is the target.
  "optax apply_if_finite(clip + adam)": lambda: optax.apply_if_finite(
    optax.chain(optax.clip_by_global_norm(MAX_NORM), _adam()), max_consecutive_errors=10
  ),
  "skip_nonfinite(clip + adam)": lambda: clipchain.skip_nonfinite(_clipped_adam()),
  "skip_spikes(skip_nonfinite(clip + adam))": lambda: clipchain.skip_spikes(
    clipchain.skip_nonfinite(_clipped_adam())
  ),
  # The same guards as a step that owns the application: decide first, then one lax.cond.
  "guarded_step(skip_nonfinite)": lambda: _guarded(clipchain.skip_nonfinite(_clipped_adam())),
  "guarded_step(skip_spikes(skip_nonfinite))": lambda: _guarded(
    clipchain.skip_spikes(clipchain.skip_nonfinite(_clipped_adam()))
  ),
}


def optimizer_step(tx: optax.GradientTransformation):
  """The step of a training loop whose gradients are given: update, then apply."""

  def step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


@dataclasses.dataclass(frozen=True)
class Workload:
  """``leaves`` parameters of ``shape`` each, in ``dtype`` (the gradients too); the step is the
  optimizer's alone, on given gradients."""

  name: str
  leaves: int
  shape: tuple[int, ...]
  dtype: str = "float32"
  # The variants it runs besides the baseline (all but the scanned ones when None).
  variants: tuple[str, ...] | None = None

  @property
  def size(self) -> int:
    n = self.leaves
    for d in self.shape:
      n *= d
    return n

  def describe(self) -> str:
    dims = "x".join(map(str, self.shape))
    size = f"{self.size / 1e6:.1f} M" if self.size >= 10**6 else f"{self.size:,}"
    kind = "" if self.dtype == "float32" else f" {self.dtype}"
    return f"{size}{kind} params, {self.leaves} leaves of {dims}"

  def make_params(self, seed: int) -> dict[str, jax.Array]:
    key = jax.random.key(seed)
    return {
      f"w{i:04d}": jax.random.normal(jax.random.fold_in(key, i), self.shape, self.dtype)
      for i in range(self.leaves)
    }

  def make_inputs(self, seed: int) -> dict[str, jax.Array]:
    """What the step takes besides params and state: here the gradients themselves."""
    return self.make_params(seed)

  def make_step(self, tx: optax.GradientTransformation | OwnStep):
    return tx.step if isinstance(tx, OwnStep) else optimizer_step(tx)


@dataclasses.dataclass(frozen=True)
class TrainStep:
  """A full training step of a small Flax decoder-only transformer language model: forward,
  backward, clip and update, on a batch of token sequences."""

  name: str
  vocab: int
  width: int
  depth: int
  heads: int
  length: int
  batch: int
  dtype: str = "float32"
  # Where the optimizer is a small part of the step, the clips the question is about: the global
  # clip, ZClip and AGC, beside optax's.
  variants: tuple[str, ...] = (
    "optax clip + adam",
    "clipchain clip + adam",
    "zclip + adam",
    "optax agc + adam",
    "clipchain agc + adam",
  )

  def model(self):
    from flax import linen as nn  # only this workload needs Flax

    width, heads, depth, vocab = self.width, self.heads, self.depth, self.vocab

    class Block(nn.Module):
      @nn.compact
      def __call__(self, x):
        mask = nn.make_causal_mask(x[..., 0])
        y = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=heads)(y, y, mask=mask)
        y = nn.Dense(4 * width)(nn.LayerNorm()(x))
        return x + nn.Dense(width)(nn.gelu(y))

    class LanguageModel(nn.Module):
      @nn.compact
      def __call__(self, tokens):
        embed = nn.Embed(vocab, width)
        x = embed(tokens)
        for _ in range(depth):
          x = Block()(x)
        return embed.attend(nn.LayerNorm()(x))

    return LanguageModel()

  @property
  def size(self) -> int:
    shapes = jax.eval_shape(lambda: self.make_params(0))
    return sum(x.size for x in jax.tree.leaves(shapes))

  def describe(self) -> str:
    return (
      f"Flax transformer LM train step, {self.size / 1e6:.1f} M params ({self.depth} blocks of "
      f"{self.width}), batch {self.batch} x {self.length} tokens"
    )

  def make_params(self, seed: int):
    tokens = jnp.zeros((1, self.length), jnp.int32)
    return self.model().init(jax.random.key(seed), tokens)["params"]

  def make_inputs(self, seed: int) -> jax.Array:
    key = jax.random.key(seed + 1000)
    return jax.random.randint(key, (self.batch, self.length + 1), 0, self.vocab)

  def make_step(self, tx: optax.GradientTransformation):
    model = self.model()

    def loss_fn(params, tokens):
      logits = model.apply({"params": params}, tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    def step(params, opt_state, tokens):
      grads = jax.grad(loss_fn)(params, tokens)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    return step


# Per-layer transforms on stacked leaves, beside the same transforms blind to the stacking.
@dataclasses.dataclass(frozen=True)
class AttentionWorkload(Workload):
  """``leaves`` transformer blocks of Flax-shaped attention projections (query, key, value:
  ``(width, heads, head_dim)``; out: ``(heads, head_dim, width)``) and a two-matrix MLP; the step
  is the optimizer's on given gradients, with the per-head largest logits QK-Clip reads (half of
  the heads above its threshold)."""

  heads: int = 8

  @property
  def size(self) -> int:
    return sum(x.size for x in jax.tree.leaves(jax.eval_shape(lambda: self.make_params(0))))

  def describe(self) -> str:
    width, head_dim = self.shape
    return (
      f"{self.size / 1e6:.1f} M params, {self.leaves} blocks of attention ({self.heads} heads of "
      f"{head_dim}, width {width}) and MLP"
    )

  def make_params(self, seed: int) -> dict[str, Any]:
    width, head_dim = self.shape
    key = jax.random.key(seed)
    shapes = {
      "attn": {
        "query": {"kernel": (width, self.heads, head_dim)},
        "key": {"kernel": (width, self.heads, head_dim)},
        "value": {"kernel": (width, self.heads, head_dim)},
        "out": {"kernel": (self.heads, head_dim, width)},
      },
      "mlp_in": {"kernel": (width, 2 * width)},
      "mlp_out": {"kernel": (2 * width, width)},
    }
    leaves, structure = jax.tree.flatten(
      {f"block_{i}": shapes for i in range(self.leaves)}, is_leaf=lambda x: isinstance(x, tuple)
    )
    return jax.tree.unflatten(
      structure,
      [jax.random.normal(jax.random.fold_in(key, i), s, self.dtype) for i, s in enumerate(leaves)],
    )

  def make_inputs(self, seed: int):
    logits = jnp.linspace(0.0, 2 * QK_THRESHOLD, self.heads)
    return self.make_params(seed), {f"block_{i}/attn": logits for i in range(self.leaves)}

  def make_step(self, tx: optax.GradientTransformation):
    def step(params, opt_state, inputs):
      grads, max_logits = inputs
      # optax.chain passes max_logits to the transforms that take it, and only to those.
      chained = optax.chain(tx)
      updates, (opt_state,) = chained.update(grads, (opt_state,), params, max_logits=max_logits)
      return optax.apply_updates(params, updates), opt_state

    return step


ATTENTION_VARIANTS = (
  "clipchain clip + adam",
  "muon",
  "subset clip + muon",
  "qk_clip + adam",
  "qk_clip + muon",
)
# Variants that need a workload of their own (scanned layers, attention projections).
WORKLOAD_SPECIFIC = ("muon", "subset clip + muon", "qk_clip + adam", "qk_clip + muon")

STACKED_VARIANTS = (
  "clipchain clip + adam",
  "layer clip + adam",
  "scanned layer clip + adam",
  "layer zclip + adam",
  "scanned layer zclip + adam",
  "clipchain agc + adam",
  "scanned agc + adam",
  "monitor + adam",
  "scanned monitor + adam",
)

WORKLOADS = {
  "large": Workload("large", 8, (2048, 1024)),
  "many": Workload("many", 1000, (64, 64)),
  # Mixed-precision training keeps bfloat16 parameters and gradients: half the bytes per pass.
  "bf16": Workload("bf16", 8, (2048, 1024), "bfloat16"),
  # The whole step: what clipping costs next to the forward and backward passes.
  "train": TrainStep("train", vocab=512, width=256, depth=4, heads=4, length=128, batch=16),
  # Scanned layers: 4 leaves stacking 8 layers of 1024x512, as large's bytes.
  "stacked": Workload("stacked", 4, (8, 1024, 512), variants=STACKED_VARIANTS),
  # Transformer blocks: Muon's matrices beside AdamW's 3-d kernels, QK-Clip's projections.
  "attention": AttentionWorkload("attention", 4, (512, 64), variants=ATTENTION_VARIANTS),
}
# At the --quick sizes (the smoke test and the fusion and temporary budget) every variant runs on
# the large and many workloads; bfloat16 and the whole train step keep the clips whose structure
# they change (float32 copies of bfloat16 leaves; the step's own gradient kernels), since each of
# their compiles costs seconds without telling anything the float32 workloads do not.
QUICK_BF16_VARIANTS = (
  "optax clip + adam",
  "clipchain clip + adam",
  "zclip + adam",
  "clipchain agc + adam",
  "clipchain value clip + adam",
  "layer clip + adam",
  "monitor + adam",
  "normalize + adam",
  "stable_spam_clip + adam",
  "clip_by_second_moment(adam)",
  "skip_nonfinite(clip + adam)",
  "guarded_step(skip_nonfinite)",
)
QUICK_WORKLOADS = {
  "large": Workload("large", 8, (128, 64)),
  "many": Workload("many", 10, (8, 8)),
  "bf16": Workload("bf16", 8, (128, 64), "bfloat16", variants=QUICK_BF16_VARIANTS),
  "train": TrainStep(
    "train",
    vocab=32,
    width=16,
    depth=1,
    heads=2,
    length=8,
    batch=2,
    variants=("optax clip + adam", "clipchain clip + adam", "zclip + adam"),
  ),
  "stacked": Workload("stacked", 4, (4, 32, 16), variants=STACKED_VARIANTS),
  "attention": AttentionWorkload("attention", 2, (32, 8), variants=ATTENTION_VARIANTS, heads=4),
}


def count_fusions(hlo_text: str, branches: bool = False) -> int:
  """Fusion instructions in optimized HLO text that every step runs: roughly, the kernels launched
  per step. The branches of a conditional are left out (clipchain measures a norm again, scaled,
  only in the branch taken where its float32 sum of squares overflowed), except with
  ``branches`` those of a conditional that returns matrices: a guarded step's update."""
  bodies = {
    m.group(2): m.group(3)
    for m in re.finditer(r"^(ENTRY )?%(\S+) \(.*?\{\n(.*?)^\}", hlo_text, re.M | re.S)
  }
  entry = re.search(r"^ENTRY %(\S+) ", hlo_text, re.M)
  if entry is None:
    return len(re.findall(r"\bfusion\(", hlo_text))
  seen, todo = set(), [entry.group(1)]
  while todo:
    name = todo.pop()
    if name in seen or name not in bodies:
      continue
    seen.add(name)
    todo.extend(re.findall(r"\b(?:calls|body|condition|to_apply)=%([\w.\-]+)", bodies[name]))
    if branches:
      for line in re.findall(r"^.* conditional\(.*$", bodies[name], re.M):
        # The update's conditional returns the parameters (arrays of rank 2 here); the rescues
        # of a norm return norms, and stay out as above.
        if re.search(r"\[\d+,\d+", line.split(" conditional(")[0]):
          todo.extend(re.findall(r"_computations?=\{?%([\w.\-]+)", line))
          todo.extend(re.findall(r", %([\w.\-]+)", line.split("branch_computations={")[-1]))
  return sum(len(re.findall(r"\bfusion\(", bodies[name])) for name in seen)


@dataclasses.dataclass
class _Prepared:
  """One variant's executable and the parameters and state it updates in place."""

  compiled: Any
  params: Any
  opt_state: Any
  row: dict[str, Any]

  def call(self, grads) -> float:
    start = time.perf_counter()
    self.params, self.opt_state = self.compiled(self.params, self.opt_state, grads)
    jax.block_until_ready((self.params, self.opt_state))
    return time.perf_counter() - start


def _prepare(name, factory, workload, grads, grad_bytes, dump_hlo: str | None) -> _Prepared:
  tx = factory()
  params = workload.make_params(seed=1)
  opt_state = tx.init(params)
  jax.block_until_ready((params, opt_state))
  start = time.perf_counter()
  lowered = jax.jit(workload.make_step(tx), donate_argnums=(0, 1)).lower(params, opt_state, grads)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  compiled_at = time.perf_counter()
  memory = compiled.memory_analysis()
  hlo = compiled.as_text()
  if dump_hlo:
    os.makedirs(dump_hlo, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "_", f"{workload.name} {name}".lower()).strip("_")
    with open(os.path.join(dump_hlo, f"{slug}.hlo.txt"), "w") as f:
      f.write(hlo)
  temp = int(memory.temp_size_in_bytes)
  row = {
    "variant": name,
    "lower_s": lowered_at - start,
    "compile_s": compiled_at - start,
    "fusions": count_fusions(hlo, branches=isinstance(tx, OwnStep)),
    "temp_bytes": temp,
    "temp_over_grads": temp / grad_bytes,
    "argument_bytes": int(memory.argument_size_in_bytes),
    "output_bytes": int(memory.output_size_in_bytes),
    "alias_bytes": int(memory.alias_size_in_bytes),
  }
  return _Prepared(compiled, params, opt_state, row)


def _paired_ratio(times: list[float], reference: list[float]) -> float:
  """The median over rounds of ``time / reference time in the same round``."""
  return statistics.median([a / b for a, b in zip(times, reference)])


def run_workload(
  workload: Workload,
  variants: dict[str, Callable[[], optax.GradientTransformation]],
  repeats: int,
  warmup: int,
  blocks: int | None = None,
  dump_hlo: str | None = None,
  log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
  """Times every variant on one workload; returns the workload's results.

  The repetitions are split into ``blocks`` (default: one per variant). Each block compiles every
  variant afresh, the compile order rotated by one per block, warms them up, then times them
  round-robin in a new random order every round. With thousands of kernels per step, an
  executable compiled later in the process runs measurably slower than an identical one compiled
  earlier (up to ~10 % here); rotating the order gives every variant every position once.
  """
  grads = workload.make_inputs(seed=0)
  jax.block_until_ready(grads)
  # The gradients are shaped like the params, whatever the step takes as input.
  grad_bytes = sum(
    x.size * x.dtype.itemsize
    for x in jax.tree.leaves(jax.eval_shape(lambda: workload.make_params(seed=0)))
  )
  names = list(variants)
  blocks = min(len(names) if blocks is None else max(blocks, 1), repeats)
  times: dict[str, list[float]] = {name: [] for name in names}
  rows: dict[str, dict[str, Any]] = {}
  compile_s: dict[str, list[float]] = {name: [] for name in names}
  rng = random.Random(0)
  for block in range(blocks):
    shift = block % len(names)
    prepared = {}
    for name in names[shift:] + names[:shift]:
      log(f"[{workload.name}] block {block + 1}/{blocks}: compiling {name}")
      prepared[name] = _prepare(
        name, variants[name], workload, grads, grad_bytes, dump_hlo if block == 0 else None
      )
      rows.setdefault(name, prepared[name].row)
      compile_s[name].append(prepared[name].row["compile_s"])
    rounds = repeats // blocks + (block < repeats % blocks)
    log(f"[{workload.name}] block {block + 1}/{blocks}: timing {len(names)} variants x {rounds}")
    order = list(names)
    for _ in range(warmup):
      for name in order:
        prepared[name].call(grads)
    for _ in range(rounds):
      rng.shuffle(order)
      for name in order:
        times[name].append(prepared[name].call(grads))
    del prepared
  base = times[BASELINE]
  clip_base = times.get(CLIP_REFERENCE)
  results = []
  for name in names:
    t = times[name]
    quartiles = statistics.quantiles(t, n=4) if len(t) > 1 else t * 3
    median = statistics.median(t)
    results.append(
      {
        **rows[name],
        "compile_s": statistics.median(compile_s[name]),
        "compile_s_all": compile_s[name],
        "median_ms": 1e3 * median,
        "q1_ms": 1e3 * quartiles[0],
        "q3_ms": 1e3 * quartiles[2],
        "min_ms": 1e3 * min(t),
        "ratio": median / statistics.median(base),
        # Each step against the baseline's step of the same round: insensitive to slow drifts
        # of the machine's load.
        "paired_ratio": _paired_ratio(t, base),
        # The same against the fixed global clip, when it ran.
        "clip_ratio": None if clip_base is None else median / statistics.median(clip_base),
        "clip_paired_ratio": None if clip_base is None else _paired_ratio(t, clip_base),
        "times_ms": [1e3 * x for x in t],
      }
    )
  return {
    "workload": workload.name,
    "description": workload.describe(),
    "params": workload.size,
    "grad_bytes": grad_bytes,
    "repeats": len(base),
    "warmup": warmup,
    "blocks": blocks,
    "variants": results,
  }


def machine() -> dict[str, Any]:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    if names:
      cpu = names[0]
  except OSError:
    pass
  return {
    "cpu": cpu,
    "cpu_count": os.cpu_count(),
    "devices": [str(d) for d in jax.devices()],
    "platform": platform.platform(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "optax": optax.__version__,
    "clipchain": clipchain.__version__,
  }


def run(
  workloads: Sequence[str] = tuple(WORKLOADS),
  variants: dict[str, Callable[[], optax.GradientTransformation]] | None = None,
  repeats: int = 100,
  warmup: int = 5,
  *,
  blocks: int | None = None,
  quick: bool = False,
  control: bool = True,
  dump_hlo: str | None = None,
  log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
  """Runs the benchmark; returns ``{"machine", "quick", "workloads": [per-workload results]}``.

  ``variants`` defaults to :data:`VARIANTS`; the baseline is added when missing, and with
  ``control`` a second copy of it whose ratio shows how far apart two identical steps measure.
  """
  variants = dict(VARIANTS if variants is None else variants)
  if BASELINE not in variants:
    variants = {BASELINE: VARIANTS[BASELINE], **variants}
  if control:
    variants[CONTROL] = variants[BASELINE]
  table = QUICK_WORKLOADS if quick else WORKLOADS
  results = [
    run_workload(table[w], _for(table[w], variants), repeats, warmup, blocks, dump_hlo, log)
    for w in workloads
  ]
  return {"machine": machine(), "quick": quick, "workloads": results}


def _for(workload, variants: dict[str, Callable[[], optax.GradientTransformation]]):
  """The variants a workload runs: all, or those it names (the baseline and control always)."""
  chosen = getattr(workload, "variants", None)
  if chosen is None:
    return {
      k: v
      for k, v in variants.items()
      if not k.startswith("scanned ") and k not in WORKLOAD_SPECIFIC
    }
  return {k: v for k, v in variants.items() if k in (BASELINE, CONTROL, *chosen)}


def _bytes(n: int) -> str:
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= size:
      return f"{n / size:.1f} {unit}"
  return f"{n} B"


def _clip_ratio(row: dict[str, Any]) -> str:
  if row.get("clip_paired_ratio") is None:
    return "-"
  return f"{row['clip_paired_ratio']:.2f} ({row['clip_ratio']:.2f})"


def markdown(results: dict[str, Any]) -> str:
  """The results as a markdown table, with the machine they came from."""
  m = results["machine"]
  lines = [
    f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, devices {', '.join(m['devices'])}; "
    f"jax {m['jax']}, optax {m['optax']}, clipchain {m['clipchain']}, Python {m['python']}.",
    "",
    "| workload | variant | median ms (IQR) | vs adam: paired (medians) "
    "| vs clip: paired (medians) | compile s | fusions | temp | temp / grads "
    "| args / out / alias |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for w in results["workloads"]:
    label = f"{w['workload']}: {w['description']}"
    for v in w["variants"]:
      lines.append(
        f"| {label} | {v['variant']} "
        f"| {v['median_ms']:.2f} ({v['q1_ms']:.2f}-{v['q3_ms']:.2f}) "
        f"| {v['paired_ratio']:.2f} ({v['ratio']:.2f}) | {_clip_ratio(v)} "
        f"| {v['compile_s']:.2f} | {v['fusions']} "
        f"| {_bytes(v['temp_bytes'])} | {v['temp_over_grads']:.2f} "
        f"| {' / '.join(_bytes(v[k]) for k in ('argument_bytes', 'output_bytes', 'alias_bytes'))} |"
      )
      label = ""
  reps = sorted({(w["repeats"], w["blocks"], w["warmup"]) for w in results["workloads"]})
  lines += [
    "",
    "Median of "
    + ", ".join(f"{r} steps in {b} blocks, {u} warm-up steps per block" for r, b, u in reps)
    + " per variant, round-robin; grads: "
    + ", ".join(f"{w['workload']} {_bytes(w['grad_bytes'])}" for w in results["workloads"])
    + (" (--quick sizes)." if results["quick"] else "."),
  ]
  return "\n".join(lines)


# The structure of every compiled step at the --quick sizes (fusions, temporaries relative to the
# gradients), recorded so that a change which adds kernels or a temporary fails the test suite.
BUDGET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "budget.json")
# Temporaries may grow by this fraction of the gradients' size before it counts (XLA's per-group
# scratch varies slightly with versions); a gradient-sized buffer is 1.0.
TEMP_SLACK = 0.05


def structure(results: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
  """``{workload: {variant: {"fusions", "temp_over_grads"}}}`` of a run."""
  return {
    w["workload"]: {
      v["variant"]: {"fusions": v["fusions"], "temp_over_grads": round(v["temp_over_grads"], 4)}
      for v in w["variants"]
    }
    for w in results["workloads"]
  }


def over_budget(results: dict[str, Any], budget: dict[str, Any]) -> list[str]:
  """Every variant whose compiled step has more fusions, or more temporary memory, than recorded."""
  problems = []
  for workload, rows in structure(results).items():
    for variant, row in rows.items():
      limit = budget.get(workload, {}).get(variant)
      if limit is None:
        problems.append(f"{workload} / {variant}: no budget recorded (--record-budget)")
        continue
      if row["fusions"] > limit["fusions"]:
        problems.append(
          f"{workload} / {variant}: {row['fusions']} fusions, budget {limit['fusions']}"
        )
      if row["temp_over_grads"] > limit["temp_over_grads"] + TEMP_SLACK:
        problems.append(
          f"{workload} / {variant}: temporaries {row['temp_over_grads']:.2f} x the gradients, "
          f"budget {limit['temp_over_grads']:.2f}"
        )
  return problems


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--repeats", type=int, default=100, help="timed steps per variant")
  parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant first")
  parser.add_argument(
    "--workloads",
    nargs="+",
    choices=sorted(WORKLOADS),
    default=list(WORKLOADS),
    help="which workloads to run",
  )
  parser.add_argument(
    "--variants",
    nargs="+",
    choices=list(VARIANTS),
    default=None,
    help=f"which variants to run ({BASELINE!r} always runs, as the baseline)",
  )
  parser.add_argument(
    "--blocks",
    type=int,
    default=None,
    help="compile-and-time blocks, the compile order rotated in each (default: one per variant)",
  )
  parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
  parser.add_argument(
    "--no-control",
    dest="control",
    action="store_false",
    help=f"skip the {CONTROL!r} row (a second copy of the baseline, the noise floor)",
  )
  parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
  parser.add_argument(
    "--check",
    action="store_true",
    help="at the --quick sizes, fail if a compiled step exceeds the fusions or temporaries "
    f"recorded in {os.path.basename(BUDGET)} (no timing is asserted)",
  )
  parser.add_argument(
    "--record-budget",
    action="store_true",
    help=f"at the --quick sizes, write the current structure to {os.path.basename(BUDGET)}",
  )
  parser.add_argument("--dump-hlo", metavar="DIR", help="write each optimized HLO module")
  args = parser.parse_args(argv)
  if args.repeats < 1 or args.warmup < 0 or (args.blocks is not None and args.blocks < 1):
    parser.error("--repeats and --blocks must be >= 1, --warmup >= 0")
  variants = None if args.variants is None else {v: VARIANTS[v] for v in args.variants}
  if args.check or args.record_budget:
    results = run(args.workloads, variants, repeats=1, warmup=0, blocks=1, quick=True)
    if args.record_budget:
      with open(BUDGET, "w") as f:
        json.dump(structure(results), f, indent=2, sort_keys=True)
        f.write("\n")
      print(f"wrote {BUDGET}")
      return results
    with open(BUDGET) as f:
      problems = over_budget(results, json.load(f))
    print("\n".join(problems) if problems else "every compiled step is within its budget")
    if problems:
      raise SystemExit(1)
    return results
  results = run(
    args.workloads,
    variants,
    args.repeats,
    args.warmup,
    blocks=args.blocks,
    quick=args.quick,
    control=args.control,
    dump_hlo=args.dump_hlo,
    log=lambda s: print(s, file=sys.stderr, flush=True),
  )
  print(markdown(results))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  return results


if __name__ == "__main__":
  main()

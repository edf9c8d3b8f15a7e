"""ZClip against the reference package ``zclip`` 1.0.0, step by step.

The reference ``ZClip.step(model)`` reads ``p.grad`` of a torch model, clips it in place and
updates float64 statistics; clipchain runs the same float32 gradients through ``lax.scan`` under
``jit``. Every step compares the clipped gradients, the threshold, the spike decision, the z-score
and the mean and variance. ``zclip`` scales by ``c / (G + 1e-6)`` and clipchain by ``c / G``:
the norms here are of order 1 and more, where that is a relative difference below 2e-6.
"""

from __future__ import annotations

import copy
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from harness import at, map_shapes, scan, scanner, stack
from zclip import ZClip

import clipchain
from clipchain.granularity import Element, Layer
from clipchain.thresholds import ZScore

SHAPES = {"dense": {"bias": (4,), "kernel": (6, 4)}, "out": {"kernel": (4, 2)}, "scale": ()}
STEPS = 160
# step -> factor: large spikes (one inside the default warmup) and moderate ones, which a
# clip_factor > 1 lifts above the norm itself.
SPIKES = {7: 3.0, 40: 10.0, 41: 30.0, 60: 2.0, 75: 100.0, 95: 1.8, 110: 15.0, 128: 2.2, 140: 50.0}
RTOL = 2e-5


def make_grads(seed: int = 0, steps: int = STEPS, shapes=SHAPES):
  """``steps`` gradient trees (float32) stacked on a leading axis, norms around 1, with spikes."""
  rng = np.random.default_rng(seed)
  t = np.arange(steps)
  scale = 0.2 * np.exp(0.25 * rng.normal(size=steps)) * (1.0 + 0.3 * np.sin(t / 20.0))
  for step, factor in SPIKES.items():
    if step < steps:
      scale[step] *= factor

  def leaf(shape):
    values = rng.normal(size=(steps, *shape)) * scale.reshape((steps,) + (1,) * len(shape))
    return values.astype(np.float32)

  return jax.tree.map(leaf, shapes, is_leaf=lambda x: isinstance(x, tuple))


class Model(torch.nn.Module):
  """A torch model with one parameter per array, for ``ZClip.step``."""

  def __init__(self, arrays):
    super().__init__()
    self.ps = torch.nn.ParameterList(
      [torch.nn.Parameter(torch.zeros(np.shape(a), dtype=torch.float32)) for a in arrays]
    )


def run_reference(sequence, **kwargs):
  """Runs ``zclip.ZClip`` over ``sequence`` (a list of steps, each a list of float32 arrays).

  Returns per-step arrays: the clipped gradients (one array per parameter), the pre-clip norm,
  the threshold applied (``min(clip value or norm, max_grad_norm)``), the spike flag, the z-score
  (NaN during warmup) and the mean and variance after the step (NaN before they exist).
  """
  ref = ZClip(**kwargs)
  model = Model(sequence[0])
  out = {k: [] for k in ("grads", "norm", "threshold", "spike", "z", "mean", "var", "buffer")}
  max_norm = kwargs.get("max_grad_norm", 1.0)
  for arrays in sequence:
    for p, g in zip(model.parameters(), arrays):
      p.grad = torch.tensor(np.array(g))
    before = copy.copy(ref)  # the statistics this step is judged against
    norm = ref.step(model)
    clip_val, z = None, np.nan
    if before.initialized:
      clip_val = before._compute_clip_val(norm)
      z = before._compute_positive_zscore(norm)[0]
    adaptive = norm if clip_val is None else clip_val
    out["grads"].append([p.grad.numpy().copy() for p in model.parameters()])
    out["norm"].append(norm)
    out["threshold"].append(adaptive if max_norm is None else min(adaptive, max_norm))
    out["spike"].append(float(clip_val is not None))
    out["z"].append(z)
    out["mean"].append(np.nan if ref.mean is None else ref.mean)
    out["var"].append(np.nan if ref.var is None else ref.var)
    out["buffer"].append(len(ref.buffer))
  grads = [np.stack(g) for g in zip(*out.pop("grads"))]
  return grads, {k: np.asarray(v, np.float64) for k, v in out.items()}


def sequence_of(grads, steps):
  return [[np.asarray(x) for x in jax.tree.leaves(at(grads, i))] for i in range(steps)]


def assert_matches_reference(updates, states, ref_grads, ref, warmup_steps, layer=""):
  """Compares one clipchain run with one reference run (``layer``: the key suffix in stats)."""
  stats = {k: np.asarray(v) for k, v in clipchain.stats(states).items()}
  key = lambda name: f"zclip/{name}{layer}"
  for got, want in zip(jax.tree.leaves(updates), ref_grads):
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=1e-7)
  np.testing.assert_allclose(stats[key("norm")], ref["norm"], rtol=1e-6)
  np.testing.assert_allclose(stats[key("threshold")], ref["threshold"], rtol=RTOL)
  np.testing.assert_array_equal(stats[key("spike")], ref["spike"])
  started = np.arange(len(ref["norm"])) >= warmup_steps - 1
  np.testing.assert_array_equal(np.isnan(ref["mean"]), ~started)
  np.testing.assert_allclose(stats[key("mean")][started], ref["mean"][started], rtol=RTOL)
  np.testing.assert_allclose(
    stats[key("std")][started] ** 2, ref["var"][started], rtol=RTOL, atol=1e-9
  )
  # During the warmup the statistics are the running mean and population variance so far.
  norms = np.asarray(ref["norm"], np.float64)
  prefix_mean = np.array([norms[: t + 1].mean() for t in range(len(norms))])
  prefix_var = np.array([norms[: t + 1].var() for t in range(len(norms))])
  np.testing.assert_allclose(stats[key("mean")][~started], prefix_mean[~started], rtol=RTOL)
  np.testing.assert_allclose(
    stats[key("std")][~started] ** 2, prefix_var[~started], rtol=RTOL, atol=1e-9
  )
  judged = ~np.isnan(ref["z"])
  np.testing.assert_allclose(stats[key("z")][judged], ref["z"][judged], rtol=1e-4, atol=1e-3)
  np.testing.assert_array_equal(stats[key("z")][~judged], 0.0)
  # The reference empties its buffer when the statistics start; clipchain's counts down to 0.
  remaining = stats[key("warmup_remaining")]
  collecting = ~started
  np.testing.assert_array_equal(warmup_steps - remaining[collecting], ref["buffer"][collecting])
  np.testing.assert_array_equal(remaining[started], 0)


MODES = [
  dict(mode="zscore", clip_option="adaptive_scaling"),
  dict(mode="zscore", clip_option="mean"),
  dict(mode="percentile"),
]
CONFIGS = [
  dict(**mode, skip_update_on_spike=skip, max_grad_norm=max_norm)
  for mode in MODES
  for skip in (False, True)
  for max_norm in (1.0, None)
] + [
  dict(clip_factor=0.7),
  dict(clip_factor=1.5, max_grad_norm=None),
  dict(clip_factor=1.5, skip_update_on_spike=True, max_grad_norm=3.0),
  # clip_option and clip_factor are ignored in percentile mode, by both.
  dict(mode="percentile", clip_option="mean", clip_factor=0.5, max_grad_norm=2.0),
  dict(alpha=0.9, z_thresh=1.5, eps=1e-3, warmup_steps=10, clip_option="mean"),
  dict(alpha=0.5, z_thresh=2.0, warmup_steps=1, mode="percentile", max_grad_norm=None),
]


@pytest.mark.parametrize(
  "kwargs", CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items())
)
def test_matches_reference_step_by_step(kwargs):
  grads = make_grads(0)
  ref_grads, ref = run_reference(sequence_of(grads, STEPS), **kwargs)
  _, updates, states = scan(clipchain.zclip(**kwargs), grads)
  warmup_steps = kwargs.get("warmup_steps", 25)
  assert_matches_reference(updates, states, ref_grads, ref, warmup_steps)
  # The sequence exercises what it should: spikes and normal steps after the warmup, and (with
  # max_grad_norm) clipping by max_grad_norm during it.
  spikes = ref["spike"][warmup_steps:]
  assert 3 <= spikes.sum() < len(spikes) - 50
  max_norm = kwargs.get("max_grad_norm", 1.0)
  if max_norm is not None:
    assert np.any(ref["norm"][:warmup_steps] > max_norm) or warmup_steps == 1
  if kwargs.get("clip_factor", 1.0) > 1.0 and kwargs.get("mode", "zscore") == "zscore":
    # A spike whose threshold c * clip_factor is above its norm: not clipped, EMA fed with c.
    lifted = (ref["spike"] == 1.0) & (ref["threshold"] >= ref["norm"])
    assert np.any(lifted)


def test_non_finite_steps_are_skipped_as_if_absent():
  """NaN and Inf steps (one in the warmup) leave the statistics as they were: the run equals the
  reference run on the sequence without them (the reference itself would be poisoned)."""
  bad = {5: np.nan, 60: np.inf, 90: -np.inf, 91: np.nan}
  steps = 120
  grads = make_grads(3, steps)
  kept = [i for i in range(steps) if i not in bad]
  ref_grads, ref = run_reference([sequence_of(grads, steps)[i] for i in kept])

  tx = clipchain.zclip()
  update = jax.jit(tx.update)
  state = tx.init(at(grads, 0))
  outputs, states = [], []
  for i in range(steps):
    g = at(grads, i)
    if i in bad:
      kernel = g["out"]["kernel"].copy()
      kernel[1, 1] = bad[i]
      g = {**g, "out": {"kernel": kernel}}
    updates, new_state = update(g, state)
    if i in bad:
      assert not all(np.all(np.isfinite(x)) for x in jax.tree.leaves(updates))
      for a, b in zip(jax.tree.leaves(new_state.policy_state), jax.tree.leaves(state.policy_state)):
        np.testing.assert_array_equal(a, b)
    else:
      outputs.append(updates)
      states.append(new_state)
    state = new_state
  assert_matches_reference(stack(outputs), stack(states), ref_grads, ref, 25)
  assert int(state.policy_state.warmup_remaining) == 0 and int(state.count) == steps


@pytest.mark.parametrize(
  "layers, kwargs",
  [
    ("module", dict()),
    (None, dict(mode="percentile", skip_update_on_spike=True, warmup_steps=10)),
    (None, dict(clip_option="mean", max_grad_norm=None, clip_factor=0.8)),
  ],
  ids=["module", "leaf-percentile-skip", "leaf-mean"],
)
def test_per_layer_matches_one_reference_per_layer(layers, kwargs):
  shapes = {k: v for k, v in SHAPES.items() if k != "scale"}
  grads = make_grads(1, shapes=shapes)
  # Layers a decade apart, so that a shared statistic could not pass for per-layer ones.
  grads["out"] = jax.tree.map(lambda x: 10.0 * x, grads["out"])
  granularity = Layer(layers) if layers else "layer"
  _, updates, states = scan(clipchain.zclip(**kwargs, granularity=granularity), grads)
  names = states.layer_names
  if layers == "module":
    members = {"dense": ["dense/bias", "dense/kernel"], "out": ["out/kernel"]}
    assert names == ("dense", "out")
  else:
    members = {n: [n] for n in names}
    assert names == ("dense/bias", "dense/kernel", "out/kernel")
  flat = {"/".join(k.key for k in path): x for path, x in jax.tree.leaves_with_path(grads)}
  flat_updates = {"/".join(k.key for k in p): x for p, x in jax.tree.leaves_with_path(updates)}
  stats = clipchain.stats(states)
  warmup_steps = kwargs.get("warmup_steps", 25)
  for name, paths in members.items():
    layer_grads = [flat[p] for p in paths]
    sequence = [[np.asarray(x[i]) for x in layer_grads] for i in range(STEPS)]
    ref_grads, ref = run_reference(sequence, **kwargs)
    layer_updates = [flat_updates[p] for p in paths]
    suffix = f"/{name}"
    np.testing.assert_allclose(stats[f"zclip/norm{suffix}"], ref["norm"], rtol=1e-6)
    assert_matches_reference(layer_updates, states, ref_grads, ref, warmup_steps, layer=suffix)
    assert ref["spike"][warmup_steps:].sum() >= 3


def test_per_unit_is_one_zclip_per_unit():
  shapes = {"b": (3,), "k": (5, 3)}
  steps = 80
  grads = make_grads(2, steps, shapes=shapes)
  kwargs = dict(warmup_steps=8, max_grad_norm=2.0)
  _, updates, states = scan(clipchain.zclip(**kwargs, granularity="unit"), grads)
  # Flax layout: the bias is one unit; each column of the kernel is one.
  units = [(lambda g: g["b"], lambda u: u["b"])] + [
    (lambda g, j=j: g["k"][:, :, j], lambda u, j=j: u["k"][:, :, j]) for j in range(3)
  ]
  spikes, means = [], []
  for of_grads, of_updates in units:
    sequence = [[np.asarray(of_grads(grads)[i])] for i in range(steps)]
    (ref_grads,), ref = run_reference(sequence, **kwargs)
    np.testing.assert_allclose(of_updates(updates), ref_grads, rtol=RTOL, atol=1e-7)
    spikes.append(ref["spike"])
    # Before its statistics start, a unit reports the running mean of its norms so far.
    prefix = np.cumsum(ref["norm"]) / np.arange(1, steps + 1)
    means.append(np.where(np.isnan(ref["mean"]), prefix, ref["mean"]))
  stats = clipchain.stats(states)
  np.testing.assert_allclose(stats["zclip/spike"], np.mean(spikes, axis=0), rtol=1e-6)
  np.testing.assert_allclose(stats["zclip/mean"], np.mean(means, axis=0), rtol=RTOL)
  assert 0.0 < np.mean(spikes) < 0.5
  # One entry per unit, shaped like the norms: the leaf's shape with the reduced axis kept.
  assert [m.shape for m in jax.tree.leaves(states.policy_state.mean)] == [(steps, 1), (steps, 1, 3)]


def test_vmap_over_independent_runs():
  seeds = (4, 5, 6)
  batch = stack([make_grads(s, 60) for s in seeds], axis=1)
  tx = clipchain.zclip(warmup_steps=10, mode="percentile")

  def run(grads):
    """Per step: the updates and the mean of the norms."""
    _, (updates, states) = scanner(tx)(grads)
    return updates, states.policy_state.mean

  updates, means = jax.jit(jax.vmap(run, in_axes=1, out_axes=1))(batch)
  for i in range(len(seeds)):
    one = jax.tree.map(lambda x, i=i: x[:, i], batch)
    want_updates, want_means = run(one)
    np.testing.assert_allclose(means[:, i], want_means, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(want_updates)):
      np.testing.assert_allclose(got[:, i], want, rtol=1e-6, atol=1e-8)
  assert not np.allclose(means[:, 0], means[:, 1])


def test_eager_equals_jit():
  grads = make_grads(7, 40)
  tx = clipchain.zclip(warmup_steps=5)
  jitted = jax.jit(tx.update)
  eager_state = jit_state = tx.init(at(grads, 0))
  for i in range(40):
    eager, eager_state = tx.update(at(grads, i), eager_state)
    jit_out, jit_state = jitted(at(grads, i), jit_state)
    for a, b in zip(jax.tree.leaves((eager, eager_state)), jax.tree.leaves((jit_out, jit_state))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert float(eager_state.policy_state.mean) > 0


def test_state_shapes_and_report():
  tx = clipchain.zclip(warmup_steps=4, granularity="layer")
  params = map_shapes(jnp.zeros, SHAPES)
  state = tx.init(params)
  policy = state.policy_state
  assert policy.mean.shape == policy.var.shape == policy.z.shape == (4,)
  assert policy.mean.dtype == jnp.float32
  assert policy.warmup_remaining.shape == (4,) and policy.warmup_remaining.dtype == jnp.int32
  assert all(x.size > 0 for x in jax.tree.leaves(state))
  stats = clipchain.stats(state)
  for key in ("mean", "std", "z", "spike", "warmup_remaining"):
    assert f"zclip/{key}/dense/kernel" in stats and f"zclip/{key}/scale" in stats
  assert int(stats["zclip/warmup_remaining/scale"]) == 4
  global_state = clipchain.zclip(warmup_steps=4, name="zc").init(params)
  assert (
    global_state.policy_state.mean.shape == global_state.policy_state.warmup_remaining.shape == ()
  )
  assert set(clipchain.stats(global_state)) >= {"zc/mean", "zc/std", "zc/z", "zc/spike"}


def test_preset_equals_policy():
  grads = make_grads(8, 50)
  a = scan(clipchain.zclip(0.9, 2.0, 1.5, 1e-6, 12, "zscore", "mean", 1.0, True), grads)
  policy = ZScore(
    alpha=0.9,
    z_thresh=2.0,
    max_grad_norm=1.5,
    warmup_steps=12,
    clip_option="mean",
    skip_update_on_spike=True,
  )
  b = scan(clipchain.clip_norm(policy, name="zclip"), grads)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert float(jnp.max(a[2].policy_state.spike)) == 1.0


@pytest.mark.parametrize(
  "kwargs, argname",
  [
    (dict(alpha=0.0), "alpha"),
    (dict(alpha=1.0), "alpha"),
    (dict(alpha=float("nan")), "alpha"),
    (dict(z_thresh=0.0), "z_thresh"),
    (dict(z_thresh=-1.0), "z_thresh"),
    (dict(z_thresh=float("inf")), "z_thresh"),
    (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(max_grad_norm=-1.0), "max_grad_norm"),
    (dict(max_grad_norm=float("inf")), "max_grad_norm"),
    (dict(eps=-1e-6), "eps"),
    (dict(eps=float("nan")), "eps"),
    (dict(warmup_steps=0), "warmup_steps"),
    (dict(warmup_steps=2.5), "warmup_steps"),
    (dict(warmup_steps=True), "warmup_steps"),
    (dict(mode="z"), "mode"),
    (dict(clip_option="adaptive"), "clip_option"),
    (dict(clip_factor=0.0), "clip_factor"),
    (dict(clip_factor=-0.5), "clip_factor"),
    (dict(skip_update_on_spike="yes"), "skip_update_on_spike"),
    (dict(granularity="elementwise"), "granularity"),
  ],
)
def test_validation(kwargs, argname):
  value = next(iter(kwargs.values()))
  # A value of the wrong type (a float or bool step count, a string flag) is a TypeError.
  wrong_type = (argname == "warmup_steps" and type(value) is not int) or (
    argname == "skip_update_on_spike"
  )
  with pytest.raises(TypeError if wrong_type else ValueError, match=re.escape(argname)) as info:
    clipchain.zclip(**kwargs)
  assert repr(next(iter(kwargs.values()))) in str(info.value)


def test_element_granularity_is_refused():
  with pytest.raises(ValueError, match="SecondMoment"):
    clipchain.zclip(granularity="element")
  with pytest.raises(ValueError, match=r"Element\(\) every value is its own group"):
    clipchain.clip_norm(ZScore(), granularity=Element())

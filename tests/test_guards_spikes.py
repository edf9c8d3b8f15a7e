"""skip_spikes: the rule against a float64 NumPy reference, and the guards composed.

The rule: the window holds the last ``window`` finite values (a step enters when every watched
value is finite, skipped or not); once it holds at least ``min_history`` values, a step is skipped
when ``x - mean > sigma * std`` for a watched value (mean and population standard deviation over
the window); a step with a non-finite watched value is always skipped and never enters.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from harness import assert_bits_equal, orbax_round_trip

import clipchain

# ---------------------------------------------------------------------------------------------
# The reference and a naive contrast


def reference(values, *, sigma, window, min_history):
  """The rule in float64, step by step.

  Args:
    values: ``(steps, quantities)``, what the guard watched at each step.

  Returns:
    ``skip`` (bool per step), ``filled`` (window length after each step), ``zscore`` (per step
    and quantity, 0 until the window is long enough) and ``margin``: per step, the smallest
    ``|x - mean - sigma * std|`` relative to the magnitudes involved (``inf`` where no comparison
    is made), to tell the steps whose decision float32 rounding could flip.
  """
  values = np.asarray(values, np.float64)
  history = []
  skip, filled, zscore, margin = [], [], [], []
  for x in values:
    finite = bool(np.all(np.isfinite(x)))
    spike, z, m = False, np.zeros_like(x), np.inf
    if len(history) >= min_history:
      rows = np.asarray(history[-window:])
      mean, std = rows.mean(axis=0), rows.std(axis=0)
      excess = x - mean - sigma * std
      spike = bool(np.any(excess > 0))
      z = (x - mean) / np.where(std > 0, std, 1.0)
      if finite:
        m = float(np.min(np.abs(excess) / (np.abs(x) + np.abs(mean) + sigma * std + 1e-30)))
    if finite:
      history.append(x)
    skip.append(not finite or spike)
    filled.append(min(len(history), window))
    zscore.append(z)
    margin.append(m)
  return np.array(skip), np.array(filled), np.array(zscore), np.array(margin)


def naive(values, *, sigma, window, min_history, nan_enters=True, skipped_enter=True):
  """What the bugs look like: a NaN that enters the window, or skipped values that never do."""
  history, skip = [], []
  for x in np.asarray(values, np.float64).reshape(len(values), -1):
    s = False
    if len(history) >= min_history:
      rows = np.asarray(history[-window:])
      s = bool(np.any(x - rows.mean(axis=0) > sigma * rows.std(axis=0)))  # False against NaN
    s |= not np.all(np.isfinite(x))
    if (nan_enters or np.all(np.isfinite(x))) and (skipped_enter or not s):
      history.append(x)
    skip.append(s)
  return np.array(skip)


# ---------------------------------------------------------------------------------------------
# Running the guard over a sequence of watched values, in one compiled scan


@functools.cache
def runner(sigma, window, min_history, watch):
  """``(grad values, losses) -> per-step skipped, last, zscore, filled``; one gradient value ``g``
  is the one-entry gradient ``[g]``, whose norm is ``|g|``."""
  tx = clipchain.skip_spikes(
    optax.sgd(0.1), sigma=sigma, window=window, min_history=min_history, watch=watch
  )

  @jax.jit
  def run(grad_values, losses):
    params = {"w": jnp.zeros(1)}

    def body(state, xs):
      g, loss = xs
      extra = {"loss": loss} if "loss" in watch else {}
      _, state = tx.update({"w": g[None]}, state, params, **extra)
      return state, (state.skipped, state.last, state.zscore, state.filled, state.total_skipped)

    return jax.lax.scan(body, tx.init(params), (grad_values, losses))[1]

  return run


def run_guard(grad_values, losses=None, *, sigma, window, min_history, watch=("grad_norm",)):
  grad_values = np.asarray(grad_values, np.float32)
  losses = np.ones_like(grad_values) if losses is None else np.asarray(losses, np.float32)
  out = runner(sigma, window, min_history, tuple(watch))(grad_values, losses)
  return [np.asarray(x) for x in out]


def random_values(seed, n, *, shift_at=None, offset=0.0):
  """Values near 1 (log-normal noise), 3% spikes of 2x to 30x, 2% NaN/+Inf/-Inf, and from
  ``shift_at`` on a lasting level shift of 5x."""
  rng = np.random.default_rng(seed)
  x = np.exp(0.2 * rng.normal(size=n))
  spikes = rng.random(n) < 0.03
  x[spikes] *= rng.uniform(2.0, 30.0, spikes.sum())
  if shift_at is not None:
    x[shift_at:] *= 5.0
  x += offset
  bad = rng.random(n) < 0.02
  x[bad] = rng.choice([np.nan, np.inf, -np.inf], bad.sum())
  return x.astype(np.float32)


def check_against_reference(watched, observed, *, sigma, window, min_history):
  skipped, last, zscore, filled, total = observed
  ref_skip, ref_filled, ref_z, margin = reference(
    watched, sigma=sigma, window=window, min_history=min_history
  )
  np.testing.assert_allclose(last, watched, rtol=1e-6)
  np.testing.assert_array_equal(filled, ref_filled)
  # float32 sums may flip a decision within rounding of the threshold, nowhere else.
  clear = margin > 1e-4
  assert (~clear).sum() <= 2
  np.testing.assert_array_equal(skipped[clear], ref_skip[clear])
  np.testing.assert_array_equal(total, np.cumsum(skipped))
  ready = np.isfinite(watched).all(axis=1) & (ref_z != 0).any(axis=1)
  np.testing.assert_allclose(zscore[ready], ref_z[ready], rtol=1e-3, atol=1e-3)
  return ref_skip


SETTINGS = [
  dict(sigma=3.0, window=16, min_history=8),
  dict(sigma=6.0, window=128, min_history=64),
  dict(sigma=2.0, window=7, min_history=7),
  dict(sigma=1.0, window=5, min_history=2),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
def test_grad_norm_matches_reference(settings):
  n = 600
  values = random_values(0, n, shift_at=n // 2)
  observed = run_guard(values, **settings)
  watched = np.abs(values)[:, None]  # the norm of [g] is |g|: -inf is an infinite norm
  ref_skip = check_against_reference(watched, observed, **settings)
  finite = np.isfinite(values)
  assert ref_skip[finite].sum() >= 5  # the sequence has spikes that must be skipped ...
  assert (~ref_skip).sum() >= n // 2  # ... and many steps that must not
  # The level shift is absorbed within a window; it does not skip every step from then on.
  assert not observed[0][n // 2 + settings["window"] :][finite[n // 2 + settings["window"] :]].all()


@pytest.mark.parametrize(
  "watch", [("loss",), ("grad_norm", "loss"), ("loss", "grad_norm")], ids="+".join
)
def test_loss_and_both_match_reference(watch):
  settings = dict(sigma=3.0, window=16, min_history=8)
  n = 500
  grads = random_values(1, n)
  losses = random_values(2, n, shift_at=n // 3, offset=-2.0)  # negative losses too
  observed = run_guard(grads, losses, watch=watch, **settings)
  columns = {"grad_norm": np.abs(grads), "loss": losses}
  watched = np.stack([columns[q] for q in watch], axis=1)
  ref_skip = check_against_reference(watched, observed, **settings)
  assert ref_skip.sum() >= 10
  if watch == ("loss",):
    # Only the loss is watched: a gradient that spikes, or is not finite, goes through.
    spikes_in_grads_only = ~np.isfinite(grads) & np.isfinite(losses)
    assert spikes_in_grads_only.any()
    assert not observed[0][spikes_in_grads_only].any()


BASE = [1.0, 1.2] * 4  # mean 1.1, std 0.1: with sigma=3 a spike is above 1.4
SMALL = dict(sigma=3.0, window=8, min_history=4)


@pytest.mark.parametrize(
  "values, expected",
  [
    pytest.param([*BASE, 5.0], [8], id="spike"),
    pytest.param([*BASE, 1.35], [], id="just_below"),
    pytest.param([*BASE, 0.01], [], id="drop"),
    pytest.param([1.0, 1.2, 1.0, 50.0, 1.1], [], id="before_min_history"),
    pytest.param([*BASE, 20.0, *BASE, *BASE], [8], id="no_skips_after_a_spike"),
    pytest.param([*BASE, np.nan, *BASE, 5.0], [8, 17], id="nan_then_spike"),
    pytest.param([*BASE, np.inf, -np.inf, *BASE], [8, 9], id="infs"),
    pytest.param([*BASE, *[10.0, 12.0] * 8], [8, 9], id="level_shift"),
  ],
)
def test_sequences_that_must_and_must_not_be_skipped(values, expected):
  skipped, _, _, filled, _ = run_guard(values, **SMALL)
  np.testing.assert_array_equal(np.flatnonzero(skipped), expected)
  ref_skip, ref_filled, _, _ = reference(np.abs(np.asarray(values))[:, None], **SMALL)
  np.testing.assert_array_equal(skipped, ref_skip)
  np.testing.assert_array_equal(filled, ref_filled)


def test_skipped_spike_enters_the_window_and_nan_does_not():
  skipped, last, _, filled, _ = run_guard([*BASE, 5.0, np.nan, 1.1], **SMALL)
  np.testing.assert_array_equal(skipped[-3:], [True, True, False])
  np.testing.assert_array_equal(filled[-4:], [8, 8, 8, 8])  # full: the window moves on
  skipped, last, _, filled, _ = run_guard([1.0, 1.2, 1.0, 1.2, 5.0, np.nan, 1.1], **SMALL)
  np.testing.assert_array_equal(filled, [1, 2, 3, 4, 5, 5, 6])
  assert np.isnan(last[5])


def test_nan_in_history_never_causes_skips():
  """A NaN in the window makes a naive rule miss every spike for a window, or skip every step."""
  values = [*BASE, np.nan, 1.0, 1.2, 5.0, *BASE]
  watched = np.abs(np.asarray(values))[:, None]
  skipped = run_guard(values, **SMALL)[0]
  np.testing.assert_array_equal(np.flatnonzero(skipped), [8, 11])
  # x - NaN > s is False: the spike at 11 goes through.
  np.testing.assert_array_equal(np.flatnonzero(naive(watched, **SMALL)), [8])
  # not (x - NaN <= s) is True: every step until the NaN leaves the window is skipped.
  naive_not_ok = []
  history = []
  for x in watched[:, 0]:
    s = len(history) >= SMALL["min_history"] and not (
      x - np.mean(history[-8:]) <= 3.0 * np.std(history[-8:])
    )
    naive_not_ok.append(s or not np.isfinite(x))
    history.append(x)
  assert sum(naive_not_ok[9:]) == 8


def test_level_shift_is_absorbed_unlike_a_window_of_accepted_values():
  values = [*BASE, *[10.0, 12.0] * 8]
  watched = np.asarray(values)[:, None]
  np.testing.assert_array_equal(np.flatnonzero(run_guard(values, **SMALL)[0]), [8, 9])
  # Keeping skipped values out of the window skips every step after the shift, for ever.
  assert naive(watched, **SMALL, skipped_enter=False)[8:].all()


@pytest.mark.parametrize("record_skipped", [True, False])
def test_a_repeated_spike_with_and_without_recording_skipped_values(record_skipped):
  """x1000 twice, two steps apart (sigma 6): the skipped first spike, in the window, hides the
  second (z about 3); kept out, the second is skipped too. As the float64 rule says both ways."""
  values = [*BASE, 1000.0, 1.0, 1.2, 1000.0, 1.0, 1.2]
  tx = clipchain.skip_spikes(
    optax.sgd(0.1), sigma=6.0, window=16, min_history=4, record_skipped=record_skipped
  )
  params = {"w": jnp.zeros(1)}
  step = jax.jit(lambda g, state: tx.update({"w": g[None]}, state, params)[1])
  state, skipped, zscores = tx.init(params), [], []
  for x in values:
    state = step(jnp.float32(x), state)
    skipped.append(bool(state.skipped))
    zscores.append(float(clipchain.stats(state)["skip_spikes/grad_norm_zscore"]))
  want = naive(np.asarray(values)[:, None], sigma=6.0, window=16, min_history=4,
               nan_enters=False, skipped_enter=record_skipped)  # fmt: skip
  np.testing.assert_array_equal(skipped, want)
  assert np.flatnonzero(skipped).tolist() == ([8] if record_skipped else [8, 11])
  if record_skipped:
    assert 2 < zscores[11] < 6


def test_watch_loss_needs_the_loss():
  tx = clipchain.skip_spikes(optax.sgd(0.1), watch=("grad_norm", "loss"), name="spikes")
  params = {"w": jnp.zeros(1)}
  with pytest.raises(ValueError, match=r"spikes watches the loss: call update\(\.\.\., loss="):
    tx.update({"w": jnp.ones(1)}, tx.init(params), params)


def test_loss_watch_ignores_grad_spikes_and_catches_loss_spikes():
  values = [*BASE, 50.0, 1.1]
  losses = [*BASE, 1.1, 50.0]
  skipped = run_guard(values, losses, watch=("loss",), **SMALL)[0]
  np.testing.assert_array_equal(np.flatnonzero(skipped), [9])
  skipped = run_guard(values, losses, watch=("grad_norm", "loss"), **SMALL)[0]
  np.testing.assert_array_equal(np.flatnonzero(skipped), [8, 9])


# ---------------------------------------------------------------------------------------------
# Reusing a clip's norm


SHAPE_PARAMS = {"a": jnp.ones((37, 53)), "b": jnp.ones((53,))}
LR = 1e-3


def step_fn(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def outside_conditionals(text: str) -> str:
  """The traced program without the branches of its conditionals: a norm is measured again,
  scaled, only where its float32 sum of squares overflowed (a ``lax.cond`` not taken otherwise)."""
  out, start = [], 0
  while (at := text.find('"stablehlo.case"', start)) >= 0:
    opened = text.index("({", at)
    out.append(text[start:opened])
    depth, i = 0, opened
    while True:
      depth += {"{": 1, "}": -1}.get(text[i], 0)
      i += 1
      if depth == 0 and text[i - 1] == "}" and text[i] == ")":
        break
    start = i + 1
  return "".join(out) + text[start:]


def gradient_reductions(tx) -> int:
  """Reductions over the (37, 53) leaf that every step runs, in the program as traced (before
  XLA could merge two)."""
  lowered = jax.jit(step_fn(tx)).lower(SHAPE_PARAMS, tx.init(SHAPE_PARAMS), SHAPE_PARAMS)
  text = outside_conditionals(lowered.as_text())
  return len(re.findall(r"stablehlo\.reduce\(.*: \(tensor<37x53xf32>", text))


def compiled_reductions(tx) -> int:
  lowered = jax.jit(step_fn(tx)).lower(SHAPE_PARAMS, tx.init(SHAPE_PARAMS), SHAPE_PARAMS)
  return len(re.findall(r"= \S+ reduce(?:-window)?\(", lowered.compile().as_text()))


def clip_adam():
  return optax.chain(clipchain.clip_by_global_norm(1.0), optax.adam(LR))


@pytest.mark.parametrize(
  "make, expected",
  [
    pytest.param(lambda: optax.adam(LR), 0, id="adam"),
    pytest.param(clip_adam, 1, id="clip_adam"),
    pytest.param(lambda: clipchain.skip_spikes(clip_adam()), 1, id="spikes(clip_adam)"),
    pytest.param(lambda: clipchain.skip_nonfinite(clip_adam()), 1, id="nonfinite(clip_adam)"),
    pytest.param(
      lambda: clipchain.skip_spikes(clipchain.skip_nonfinite(clip_adam())),
      1,
      id="spikes(nonfinite(clip_adam))",
    ),
    pytest.param(
      lambda: clipchain.skip_nonfinite(clipchain.skip_spikes(clip_adam())),
      1,
      id="nonfinite(spikes(clip_adam))",
    ),
    pytest.param(
      lambda: clipchain.skip_spikes(
        optax.chain(
          optax.inject_hyperparams(clipchain.clip_by_global_norm)(max_norm=1.0), optax.adam(LR)
        )
      ),
      1,
      id="spikes(inject_hyperparams(clip)_adam)",
    ),
    pytest.param(
      lambda: clipchain.skip_spikes(optax.chain(clipchain.clip_by_layer_norm(1.0), optax.adam(LR))),
      1,
      id="spikes(layer_clip_adam)",
    ),
    # Without a clip at the head the guard measures the norm itself, once for any nesting.
    pytest.param(lambda: clipchain.skip_spikes(optax.adam(LR)), 1, id="spikes(adam)"),
    pytest.param(
      lambda: clipchain.skip_nonfinite(clipchain.skip_spikes(optax.adam(LR))),
      1,
      id="nonfinite(spikes(adam))",
    ),
    # A masked clip measures part of the tree: the guard cannot reuse its norm.
    pytest.param(
      lambda: clipchain.skip_spikes(
        optax.chain(
          optax.masked(clipchain.clip_by_global_norm(1.0), {"a": True, "b": False}),
          optax.adam(LR),
        )
      ),
      2,
      id="spikes(masked_clip_adam)",
    ),
    # The clip is not at the head: what it measures is Adam's output, not the gradient.
    pytest.param(
      lambda: clipchain.skip_spikes(
        optax.chain(optax.adam(LR), clipchain.clip_by_global_norm(1.0))
      ),
      2,
      id="spikes(adam_clip)",
    ),
  ],
)
def test_guards_reuse_the_clip_norm(make, expected):
  assert gradient_reductions(make()) == expected


def test_compiled_program_has_no_extra_reduction():
  """In the compiled program too: the guard adds no reduction to a clipped chain, and adds the
  norm's reductions to an unclipped one."""
  with_clip = compiled_reductions(clip_adam())
  assert with_clip > 0
  assert compiled_reductions(clipchain.skip_nonfinite(clip_adam())) == with_clip
  assert compiled_reductions(optax.adam(LR)) == 0
  assert compiled_reductions(clipchain.skip_nonfinite(optax.adam(LR))) == with_clip


# ---------------------------------------------------------------------------------------------
# Composition


def tree_params():
  rng = np.random.default_rng(0)
  return {"k": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": jnp.zeros(4)}


def tree_grads(n, seed=1, *, nan_at=(), spike_at=()):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    g = {"k": rng.normal(size=(3, 4)), "b": rng.normal(size=4)}
    # Norms within a few percent of 4, so that only the injected spikes stand out.
    scale = 4.0 * (1.0 + 0.03 * rng.normal()) / np.sqrt(sum((x**2).sum() for x in g.values()))
    g = {k: scale * x for k, x in g.items()}
    if i in spike_at:
      g = jax.tree.map(lambda x: 50.0 * x, g)
    if i in nan_at:
      g["b"][1] = np.nan
    out.append(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g))
  return out


SPIKES = dict(sigma=3.0, window=8, min_history=4)
ORDERS = {
  "spikes(nonfinite)": lambda: clipchain.skip_spikes(
    clipchain.skip_nonfinite(clip_adam()), **SPIKES
  ),
  "nonfinite(spikes)": lambda: clipchain.skip_nonfinite(
    clipchain.skip_spikes(clip_adam(), **SPIKES)
  ),
}


def guard_states(state):
  """``(skip_nonfinite state, skip_spikes state)`` of two nested guards, in either order."""
  outer, inner = state, state.inner_state
  return (outer, inner) if isinstance(outer, clipchain.SkipNonFiniteState) else (inner, outer)


@pytest.mark.parametrize("order", list(ORDERS))
def test_guards_compose_in_either_order(order):
  nan_at, spike_at, n = (1, 9), (5, 16), 18
  tx = ORDERS[order]()
  step = jax.jit(step_fn(tx))
  params, state = tree_params(), tx.init(tree_params())
  finite_seen = 0
  for i, grads in enumerate(tree_grads(n, nan_at=nan_at, spike_at=spike_at)):
    new_params, state = step(params, state, grads)
    nonfinite, spikes = guard_states(state)
    bad = i in nan_at or i in spike_at
    # Each guard judges every step and keeps its own count, whichever one skips it.
    assert bool(nonfinite.skipped) == (i in nan_at)
    assert bool(spikes.skipped) == bad
    assert int(nonfinite.total_skipped) == sum(j <= i for j in nan_at)
    assert int(spikes.total_skipped) == sum(j <= i for j in (*nan_at, *spike_at))
    # The spike guard sees this step's norm, NaN included, and a NaN never enters its window.
    finite_seen += i not in nan_at
    assert int(spikes.filled) == min(finite_seen, SPIKES["window"])
    norm = float(spikes.last[0])
    assert np.isnan(norm) if i in nan_at else norm == pytest.approx(optax.tree.norm(grads))
    if bad:
      assert_bits_equal(new_params, params)
    else:
      assert not np.array_equal(new_params["k"], params["k"])
    params = new_params
  stats = clipchain.stats(state)
  assert float(stats["skip_nonfinite/total_skipped"]) == len(nan_at)
  assert float(stats["skip_spikes/total_skipped"]) == len(nan_at) + len(spike_at)
  # The run ends where the same composed guards end on the good batches alone.
  batches = tree_grads(n, nan_at=nan_at, spike_at=spike_at)
  ref_params, ref_state = tree_params(), tx.init(tree_params())
  for i, grads in enumerate(batches):
    if i not in nan_at and i not in spike_at:
      ref_params, ref_state = step(ref_params, ref_state, grads)
  assert int(ref_state.total_skipped) == 0
  assert_bits_equal(params, ref_params)
  assert_bits_equal(state.inner_state.inner_state, ref_state.inner_state.inner_state)


def test_skipped_step_keeps_the_inner_clip_statistics_of_the_last_applied_step():
  """The guard reports this step; the clip inside it, rolled back, still describes the last
  applied one."""
  tx = ORDERS["spikes(nonfinite)"]()
  step = jax.jit(step_fn(tx))
  params, state = tree_params(), tx.init(tree_params())
  batches = tree_grads(7, spike_at=(6,))
  for grads in batches:
    params, state = step(params, state, grads)
  stats = clipchain.stats(state)
  assert float(stats["skip_spikes/skipped"]) == 1.0
  assert float(stats["skip_spikes/grad_norm"]) == pytest.approx(optax.tree.norm(batches[6]))
  assert float(stats["clip_by_global_norm/norm"]) == pytest.approx(optax.tree.norm(batches[5]))


# ---------------------------------------------------------------------------------------------
# Inside optax.MultiSteps


K = 3


def test_statistics_advance_once_per_optimizer_step_inside_multisteps():
  guard = clipchain.skip_spikes(
    clipchain.skip_nonfinite(clip_adam()), **{**SPIKES, "min_history": 3}
  )
  tx = optax.MultiSteps(guard, every_k_schedule=K)

  @jax.jit
  def step(params, state, grads, loss):
    updates, state = tx.update(grads, state, params, loss=loss)
    return optax.apply_updates(params, updates), state

  spike_micro, nan_loss_micro = 16, 11  # optimizer steps 5 and 3 (the loss of their last batch)
  params, state = tree_params(), tx.init(tree_params())
  for i, grads in enumerate(tree_grads(8 * K, spike_at=(spike_micro,))):
    loss = np.nan if i == nan_loss_micro else 1.0
    new_params, state = step(params, state, grads, jnp.float32(loss))
    done = (i + 1) // K  # optimizer steps completed
    stats = clipchain.stats(state)
    assert float(stats["skip_spikes/history_length"]) == min(done, SPIKES["window"])
    assert float(stats["skip_nonfinite/total_skipped"]) == (done > 3)
    assert float(stats["skip_spikes/total_skipped"]) == (done > 5)
    assert int(state.gradient_step) == done
    applied = i % K == K - 1 and done - 1 not in (3, 5)
    assert np.array_equal(new_params["k"], params["k"]) != applied
    params = new_params
  adam_count = [int(c) for _, c in optax.tree.get_all_with_path(state, "count")]
  assert adam_count == [6, 6]  # the clip's and Adam's: 8 optimizer steps, 2 skipped


def test_nonfinite_microbatch_dropped_by_a_guard_around_multisteps():
  """A guard around MultiSteps drops a bad micro-batch before it enters the accumulator."""
  multi = optax.MultiSteps(clip_adam(), every_k_schedule=K).gradient_transformation()
  tx = clipchain.skip_nonfinite(multi)
  step = jax.jit(step_fn(tx))
  clean = tree_grads(2 * K)
  bad = tree_grads(1, seed=7, nan_at=(0,))[0]
  runs = []
  for batches in ([*clean[:2], bad, *clean[2:]], clean):
    params, state = tree_params(), tx.init(tree_params())
    for grads in batches:
      params, state = step(params, state, grads)
    runs.append((params, state))
  (params, state), (ref_params, ref_state) = runs
  assert int(state.total_skipped) == 1
  assert int(state.inner_state.gradient_step) == 2
  assert_bits_equal(params, ref_params)
  assert_bits_equal(state.inner_state, ref_state.inner_state)


# ---------------------------------------------------------------------------------------------
# Statistics, checkpoints, validation


def test_stats_keys():
  both = clipchain.skip_spikes(optax.sgd(0.1), watch=("grad_norm", "loss"))
  assert set(clipchain.stats(both.init(tree_params()))) == {
    "skip_spikes/skipped",
    "skip_spikes/total_skipped",
    "skip_spikes/history_length",
    "skip_spikes/grad_norm",
    "skip_spikes/grad_norm_zscore",
    "skip_spikes/loss",
    "skip_spikes/loss_zscore",
  }
  loss_only = clipchain.skip_spikes(optax.sgd(0.1), watch=("loss",), name="spikes")
  assert set(clipchain.stats(loss_only.init(tree_params()))) == {
    "spikes/skipped",
    "spikes/total_skipped",
    "spikes/history_length",
    "spikes/loss",
    "spikes/loss_zscore",
  }
  nested = ORDERS["spikes(nonfinite)"]().init(tree_params())
  assert {k.split("/")[0] for k in clipchain.stats(nested)} == {
    "skip_spikes",
    "skip_nonfinite",
    "clip_by_global_norm",
  }


def test_stats_values_follow_the_state():
  values, losses = [*BASE, 5.0], [*BASE, 1.1]
  tx = clipchain.skip_spikes(optax.sgd(0.1), watch=("grad_norm", "loss"), **SMALL)
  params = {"w": jnp.zeros(1)}
  state = tx.init(params)
  update = jax.jit(lambda g, state, loss: tx.update({"w": g[None]}, state, params, loss=loss)[1])
  for g, loss in zip(values, losses):
    state = update(jnp.float32(g), state, jnp.float32(loss))
  stats = clipchain.stats(state)
  assert float(stats["skip_spikes/skipped"]) == 1.0
  assert float(stats["skip_spikes/total_skipped"]) == 1.0
  assert float(stats["skip_spikes/history_length"]) == 8.0
  assert float(stats["skip_spikes/grad_norm"]) == 5.0
  assert float(stats["skip_spikes/grad_norm_zscore"]) == pytest.approx((5.0 - 1.1) / 0.1, rel=1e-4)
  assert float(stats["skip_spikes/loss"]) == pytest.approx(1.1)
  assert float(stats["skip_spikes/loss_zscore"]) == pytest.approx(0.0, abs=1e-4)


def test_orbax_round_trip(tmp_path):
  tx = clipchain.skip_spikes(
    clipchain.skip_nonfinite(clip_adam(), max_consecutive=3, name="finite"),
    watch=("grad_norm", "loss"),
    **SPIKES,
  )

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params, loss=jnp.float32(1.0))
    return optax.apply_updates(params, updates), state

  params, state = tree_params(), tx.init(tree_params())
  batches = tree_grads(9, nan_at=(2,), spike_at=(6,))
  for grads in batches[:8]:
    params, state = step(params, state, grads)
  restored = orbax_round_trip(tmp_path / "state", state)
  assert_bits_equal(restored, state)
  assert (restored.name, restored.watch) == ("skip_spikes", ("grad_norm", "loss"))
  assert (restored.inner_state.name, restored.inner_state.max_consecutive) == ("finite", 3)
  assert int(restored.total_skipped) == 2
  assert int(restored.inner_state.total_skipped) == 1
  assert_bits_equal(step(params, restored, batches[8]), step(params, state, batches[8]))


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(sigma=-1.0), "sigma"),
    (dict(sigma=float("nan")), "sigma"),
    (dict(window=0), "window"),
    (dict(window=1), "window must be an integer >= 2"),
    (dict(sigma=0.0), r"sigma must be in \(0.0, inf\]"),
    (dict(min_history=1), "min_history must be an integer >= 2"),
    (dict(window=-4), "window"),
    (dict(window=2.5), "window"),
    (dict(min_history=0), "min_history"),
    (dict(window=8, min_history=9), "min_history must be at most window=8"),
    (dict(watch=("grad_norm", "lr")), "watch"),
    (dict(watch="loss"), "watch"),
    (dict(watch=()), "watch"),
  ],
)
def test_validation(kwargs, match):
  wrong_type = isinstance(kwargs.get("window"), float) or isinstance(kwargs.get("watch"), str)
  with pytest.raises(TypeError if wrong_type else ValueError, match=match):
    clipchain.skip_spikes(optax.sgd(0.1), **kwargs)


@pytest.mark.parametrize("window", [2, 3, 128])
def test_default_min_history_fits_any_window(window):
  tx = clipchain.skip_spikes(optax.sgd(0.1), window=window, sigma=1e-6)
  params = {"w": jnp.zeros(1)}
  state = tx.init(params)
  skipped = []
  for g in [1.0] * max(2, window // 2) + [2.0]:
    _, state = tx.update({"w": jnp.array([g])}, state, params)
    skipped.append(bool(state.skipped))
  # Steady values are never spikes; the larger one is, once half the window (at least 2,
  # at most the window) is filled.
  assert skipped == [False] * max(2, window // 2) + [True]

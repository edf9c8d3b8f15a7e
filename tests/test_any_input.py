"""Any input a user can give: every public transform either refuses it at construction, with an
error that names the argument, or returns finite updates of the right shapes and dtypes under jit.

Hypothesis draws the transform, its hyperparameters (valid, out of range, or of the wrong type)
and a pytree: empty, scalar and zero-size leaves, float32, bfloat16 and float16 mixed.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from catalog import update
from hypothesis import event, given, settings
from hypothesis import strategies as st

import clipchain

BAD = st.one_of(
  st.sampled_from([-1.0, math.nan, math.inf, -math.inf, 3e39, -3, 2.5]),
  st.sampled_from(["1.0", True, None, [1.0]]),
)


def maybe(strategy):
  return st.one_of(st.none(), strategy)


def factories(mixed: bool):
  """Each public factory and a strategy for the keyword arguments it is given: valid values, or
  (``mixed``) sometimes an invalid or ill-typed one."""

  def arg(valid):
    return st.one_of(valid, BAD) if mixed else valid

  def floats(low, high):
    return arg(st.floats(low, high))

  def ints(low, high):
    return arg(st.integers(low, high))

  return {
    "clip": (clipchain.clip, st.fixed_dictionaries({"max_delta": floats(0, 1e3)})),
    "clip_by_global_norm": (
      clipchain.clip_by_global_norm,
      st.fixed_dictionaries({"max_norm": floats(0, 1e3)}),
    ),
    "clip_by_block_rms": (
      clipchain.clip_by_block_rms,
      st.fixed_dictionaries({"threshold": floats(0, 1e3)}),
    ),
    "clip_by_layer_norm": (
      clipchain.clip_by_layer_norm,
      st.fixed_dictionaries(
        {"max_norm": floats(0, 1e3)}, optional={"layers": st.sampled_from(["module", "leaf"])}
      ),
    ),
    "adaptive_grad_clip": (
      clipchain.adaptive_grad_clip,
      st.fixed_dictionaries({"clipping": floats(0, 1)}, optional={"eps": floats(0, 1e-2)}),
    ),
    "autoclip": (
      clipchain.autoclip,
      st.fixed_dictionaries(
        {"percentile": floats(0, 100), "window": ints(1, 6)},
        optional={"granularity": st.sampled_from(["global", "layer", "unit"])},
      ),
    ),
    "zclip": (
      clipchain.zclip,
      st.fixed_dictionaries(
        {"alpha": floats(0.01, 0.99), "z_thresh": floats(0.1, 5), "warmup_steps": ints(1, 4)},
        optional={
          "max_grad_norm": maybe(floats(0.1, 10)),
          "eps": floats(0, 1e-2),
          "mode": st.sampled_from(["zscore", "percentile"]),
          "granularity": st.sampled_from(["global", "layer", "unit", "element"]),
        },
      ),
    ),
    "quantile_clip": (
      clipchain.quantile_clip,
      st.fixed_dictionaries(
        {
          "target_quantile": floats(0, 1),
          "learning_rate": floats(0.01, 5),
          "initial_threshold": floats(0.01, 10),
        },
        optional={"granularity": st.sampled_from(["global", "layer", "unit"])},
      ),
    ),
    "adagc": (
      clipchain.adagc,
      st.fixed_dictionaries(
        {"ratio": floats(1, 3), "beta": floats(0, 0.99), "warmup_steps": ints(0, 4)},
        optional={"warmup_max_norm": maybe(floats(0, 10)), "eps": floats(0, 1e-2)},
      ),
    ),
    "spam_clip": (
      clipchain.spam_clip,
      st.fixed_dictionaries(
        {"threshold": floats(1, 1e4), "beta2": floats(0, 0.999), "warmup_steps": ints(0, 3)},
        optional={"granularity": st.sampled_from(["global", "layer", "unit", "element"])},
      ),
    ),
    "skip_nonfinite": (
      lambda **kw: clipchain.skip_nonfinite(
        optax.chain(clipchain.clip_by_global_norm(1.0), optax.sgd(0.1)), **kw
      ),
      st.fixed_dictionaries({}, optional={"max_consecutive": maybe(ints(0, 5))}),
    ),
    "skip_spikes": (
      lambda **kw: clipchain.skip_spikes(optax.sgd(0.1), **kw),
      st.fixed_dictionaries({"sigma": floats(0, 10), "window": ints(1, 8)}),
    ),
  }


DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
SHAPES = [(), (0,), (3,), (2, 3), (0, 4), (2, 1, 3)]


@st.composite
def pytrees(draw):
  """A dict of up to four leaves (maybe none, maybe nested) of mixed float dtypes and shapes."""
  count = draw(st.integers(0, 4))
  tree = {}
  for i in range(count):
    shape = draw(st.sampled_from(SHAPES))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([0.0, 1e-3, 1.0, 50.0]))
    value = jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), dtype)
    if i % 2:
      tree.setdefault("nested", {})[f"w{i}"] = value
    else:
      tree[f"w{i}"] = value
  return tree


VALID = factories(mixed=False)
MIXED = factories(mixed=True)


def check_refused_or_finite(data, name, table):
  factory, kwargs_strategy = table[name]
  kwargs = data.draw(kwargs_strategy, label="kwargs")
  try:
    tx = factory(**kwargs)
  except (TypeError, ValueError) as e:
    # A clear refusal names an argument it was given (or the granularity it cannot serve).
    assert any(arg in str(e) for arg in (*kwargs, "granularity", "every value")), e
    event("refused")
    return
  event("ran")
  params = data.draw(pytrees(), label="params")
  state = tx.init(params)
  step = jax.jit(lambda g, s: update(tx, g, s, params))
  for seed in range(2):
    grads = jax.tree.map(
      lambda p, seed=seed: jnp.asarray(
        np.random.default_rng(seed).normal(size=p.shape) * 3.0, p.dtype
      ),
      params,
    )
    updates, state = step(grads, state)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
      assert u.shape == p.shape and u.dtype == p.dtype, (name, u.dtype, p.dtype)
      assert np.all(np.isfinite(np.asarray(u, np.float32))), (name, kwargs, u)
  for value in clipchain.stats(state).values():
    assert not np.any(np.isnan(np.asarray(value))), (name, kwargs)


@pytest.mark.parametrize("name", sorted(VALID))
@settings(deadline=None, max_examples=8, derandomize=True, database=None)
@given(data=st.data())
def test_valid_hyperparameters_give_finite_updates_on_any_tree(name, data):
  check_refused_or_finite(data, name, VALID)


@pytest.mark.parametrize("name", sorted(MIXED))
@settings(deadline=None, max_examples=8, derandomize=True, database=None)
@given(data=st.data())
def test_any_hyperparameters_are_refused_clearly_or_give_finite_updates(name, data):
  check_refused_or_finite(data, name, MIXED)

"""The catalog holds everything exported, and every rule works at every granularity that accepts it.

``tests/catalog.py`` is the one list the cross-cutting tests run over; the first test here fails
when something is exported that it does not hold. The rest runs every rule at every built-in
granularity (a stacked leaf included) against float64 NumPy.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from catalog import GRANULARITIES, POLICIES, PRESETS, RULES, TRANSFORMS

import clipchain
from clipchain import granularity, rules, thresholds


def _exported(module, base) -> set[str]:
  out = set()
  for name in module.__all__:
    obj = getattr(module, name)
    if isinstance(obj, type) and issubclass(obj, base) and not inspect.isabstract(obj):
      out.add(name)
  return out


def _transform_factories() -> set[str]:
  """The exported functions that return a transformation (read from their annotations)."""
  out = set()
  for name in clipchain.__all__:
    obj = getattr(clipchain, name)
    if inspect.isfunction(obj):
      # Annotations are postponed: the return annotation is its source text.
      returned = str(inspect.signature(obj).return_annotation)
      if returned.startswith("optax.GradientTransformation"):
        out.add(name)
  return out


def test_every_exported_policy_granularity_rule_and_transform_is_in_the_catalog():
  assert _exported(thresholds, thresholds.ThresholdPolicy) == set(POLICIES)
  assert _exported(granularity, granularity.Granularity) == set(GRANULARITIES)
  assert _exported(rules, rules.Rule) == set(RULES)
  factories = _transform_factories()
  assert {"clip_norm", "monitor", "skip_nonfinite", "clip_by_second_moment", "qk_clip"} <= factories
  # qk_clip acts on attention projections given their logits (update(..., max_logits=...)), so it
  # cannot run on the catalog's generic trees; tests/test_qk_clip.py covers the same ground on
  # attention trees: jit and eager, inject_hyperparams, donation, x64, vmap, shardings.
  factories -= {"qk_clip"}
  assert factories - {"clip_norm"} <= set(TRANSFORMS)
  # Every preset (a transform made from hyperparameters alone) with its required arguments.
  wrappers = {"skip_nonfinite", "skip_spikes", "clip_by_second_moment"}
  assert factories - wrappers - {"clip_norm"} == set(PRESETS)


# A stacked leaf (three layers of a 4 -> 5 kernel), a kernel, a bias and a scalar.
SHAPES = {"stack": (3, 4, 5), "w": (4, 2), "b": (2,), "s": ()}
THRESHOLD = 0.7


def _reduced(name: str, key: str) -> tuple[int, ...] | None:
  """The axes one group of leaf ``key`` spans at granularity ``name`` (``None``: the tree)."""
  ndim = len(SHAPES[key])
  if name == "Global":
    return None
  if name == "Element":
    return ()
  stacked = key == "stack"
  if name == "Layer":
    return tuple(range(1, ndim)) if stacked else tuple(range(ndim))
  # Unit, flax layout: a kernel's input axis (after the stacked axis); a vector is one unit.
  if stacked:
    return (1,)
  return (0,) if ndim == 2 else tuple(range(ndim))


def reference(name: str, rule: str, grads: dict[str, np.ndarray]):
  """The clipped tree and its norm, from float64 NumPy."""
  g = {k: np.asarray(v, np.float64) for k, v in grads.items()}
  total = np.sqrt(sum(np.sum(x**2) for x in g.values()))
  norms = {}
  for k, x in g.items():
    axes = _reduced(name, k)
    norms[k] = (
      np.full(x.shape, total) if axes is None else np.sqrt(np.sum(x**2, axis=axes, keepdims=True))
    )
  if name in ("Global", "Layer"):
    largest = {k: max(np.max(n) for n in norms.values()) for k in g}
  else:
    largest = {k: np.max(n) for k, n in norms.items()}
  out = {}
  for k, x in g.items():
    n, c = norms[k], THRESHOLD
    if rule == "Clip":
      factor = np.where(n > c, c / np.where(n > 0, n, 1), 1.0)
    elif rule == "Rescale":
      factor = np.where(n > c, c / largest[k], 1.0)
    else:
      factor = np.where(n > 0, c / np.where(n > 0, n, 1), 0.0)
    out[k] = x * factor
  return out, np.sqrt(sum(np.sum(x**2) for x in out.values()))


PAIRS = [(g, r) for g in GRANULARITIES for r in RULES]


@pytest.mark.parametrize("name, rule", PAIRS, ids=[f"{g}-{r}" for g, r in PAIRS])
def test_every_rule_at_every_granularity_matches_numpy(name, rule):
  where, how = GRANULARITIES[name](), RULES[rule]()
  if name == "Element" and rule == "Normalize":
    # A group is one value: setting every value's magnitude to the threshold is sign descent.
    with pytest.raises(ValueError, match=r"Element granularity.*sign descent"):
      where.check_rule(how)
    return
  rng = np.random.default_rng(0)
  grads = {k: (rng.normal(size=s) * 0.5).astype(np.float32) for k, s in SHAPES.items()}
  grads["stack"][1] *= 4.0  # one layer of the stack well above the threshold
  tx = clipchain.clip_norm(THRESHOLD, granularity=where, rule=how, name="c")
  state = tx.init(grads)
  clipped, state = jax.jit(tx.update)(jax.tree.map(jnp.asarray, grads), state)
  want, want_norm = reference(name, rule, grads)
  for k in SHAPES:
    np.testing.assert_allclose(np.asarray(clipped[k]), want[k], rtol=2e-6, atol=1e-7, err_msg=k)
  np.testing.assert_allclose(float(state.clipped_norm), want_norm, rtol=2e-6)

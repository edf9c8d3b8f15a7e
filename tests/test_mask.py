"""``mask=``: clip a subset of the leaves, pass the others through, report the whole tree's norm.

References: optax.masked (the same subset, unclipped leaves untouched), float64 NumPy norms, and
the arrangement Levanter and Marin write by hand for Muon (the clip inside the AdamW branch of a
partition), which the subset clip beside ``optax.contrib.muon`` must equal bit for bit.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from catalog import PRESETS
from flax import linen as nn
from harness import assert_bits_equal, norm64, normal_tree

import clipchain

SHAPES = {"dense": {"kernel": (8, 4), "bias": (4,)}, "out": {"kernel": (4, 3), "bias": (3,)}}
SHAPES["scale"] = ()


def not_matrix(tree):
  return jax.tree.map(lambda x: jnp.ndim(x) != 2, tree)


def muon_labels(tree):
  return jax.tree.map(lambda x: "muon" if jnp.ndim(x) == 2 else "adamw", tree)


def subset(tree, mask):
  return jax.tree.leaves(jax.tree.map(lambda m, x: x if m else None, mask, tree))


# Every preset, with a threshold that binds on the gradients below (scale 3) where it has one.
MASKABLE = {name: functools.partial(make, *args) for name, (make, args) in PRESETS.items()}


@pytest.mark.parametrize("name", sorted(MASKABLE))
def test_every_preset_clips_the_subset_as_optax_masked_and_reports_the_whole_norm(name):
  params = normal_tree(SHAPES, seed=0)
  grads = [normal_tree(SHAPES, seed=s, scale=3.0) for s in (1, 2, 3)]
  mask = not_matrix(params)
  ours, reference = MASKABLE[name](mask=mask), optax.masked(MASKABLE[name](), mask)
  state, ref_state = ours.init(params), reference.init(params)
  step, ref_step = jax.jit(ours.update), jax.jit(reference.update)
  for g in grads:
    updates, state = step(g, state, params)
    expected, ref_state = ref_step(g, ref_state, params)
    assert_bits_equal(updates, expected)
    for path in ("dense/kernel", "out/kernel"):  # passed through: the very values
      assert_bits_equal(updates[path.split("/")[0]]["kernel"], g[path.split("/")[0]]["kernel"])
    stats, ref_stats = clipchain.stats(state), clipchain.stats(ref_state)
    total = next(v for k, v in stats.items() if k.endswith("/total_norm"))
    np.testing.assert_allclose(total, norm64(g), rtol=1e-6)
    # Beside total_norm, the statistics are those of the transform on the subset alone.
    assert {k: v for k, v in stats.items() if not k.endswith("/total_norm")}.keys() == (
      ref_stats.keys()
    )
    for key, value in ref_stats.items():
      np.testing.assert_array_equal(stats[key], value, err_msg=key)
    norm = next(v for k, v in stats.items() if k.endswith("/norm"))
    if name != "stable_spam_clip":  # its second clip measures what the first one clipped
      np.testing.assert_allclose(norm, norm64(subset(g, mask)), rtol=1e-6)


def test_a_mask_as_pytree_prefix_or_callable_is_the_same():
  params = normal_tree(SHAPES, seed=0)
  g = normal_tree(SHAPES, seed=1, scale=3.0)
  masks = [
    not_matrix(params),
    {
      "dense": {"kernel": False, "bias": True},
      "out": {"kernel": False, "bias": True},
      "scale": True,
    },
    not_matrix,
  ]
  results = []
  for mask in masks:
    tx = clipchain.clip_by_layer_norm(0.5, mask=mask)
    updates, state = tx.update(g, tx.init(params), params)
    results.append((updates, clipchain.stats(state)))
  for updates, stats in results[1:]:
    assert_bits_equal(updates, results[0][0])
    assert stats.keys() == results[0][1].keys()
  # The groups keep their paths in the whole tree.
  assert sorted(k for k in results[0][1] if "/norm/" in k) == [
    "clip_by_layer_norm/norm/dense/bias",
    "clip_by_layer_norm/norm/out/bias",
    "clip_by_layer_norm/norm/scale",
  ]
  whole = {"dense": True, "out": False, "scale": False}  # a prefix: one module clipped whole
  tx = clipchain.clip_by_global_norm(0.1, mask=whole)
  updates, state = tx.update(g, tx.init(params), params)
  np.testing.assert_allclose(clipchain.stats(state)["clip_by_global_norm/norm"], norm64(g["dense"]))
  assert_bits_equal(updates["out"], g["out"])


def test_nothing_or_everything_selected():
  params = normal_tree(SHAPES, seed=0)
  g = normal_tree(SHAPES, seed=1, scale=3.0)
  none = clipchain.zclip(granularity="layer", mask=jax.tree.map(lambda _: False, params))
  updates, state = jax.jit(none.update)(g, none.init(params), params)
  assert_bits_equal(updates, g)
  stats = clipchain.stats(state)
  assert all(jnp.shape(v) == () for v in stats.values())  # no zero-size per-group vectors
  assert float(stats["zclip/norm"]) == 0.0
  np.testing.assert_allclose(stats["zclip/total_norm"], norm64(g), rtol=1e-6)
  every = clipchain.clip_by_global_norm(1.0, mask=lambda t: jax.tree.map(lambda _: True, t))
  updates, state = every.update(g, every.init(params), params)
  expected, _ = clipchain.clip_by_global_norm(1.0).update(
    g, clipchain.clip_by_global_norm(1.0).init(params)
  )
  assert_bits_equal(updates, expected)
  stats = clipchain.stats(state)
  assert stats["clip_by_global_norm/total_norm"] == stats["clip_by_global_norm/norm"]


@pytest.mark.parametrize("name", ["adagc", "stable_spam_clip", "clip_by_layer_norm"])
def test_optax_masked_with_every_leaf_masked_out_gives_loggable_scalars(name):
  factory, args = PRESETS[name]
  params = normal_tree(SHAPES, seed=0)
  tx = optax.masked(factory(*args), jax.tree.map(lambda _: False, params))
  _, state = jax.jit(tx.update)(normal_tree(SHAPES, seed=1), tx.init(params), params)
  logged = {k: float(v) for k, v in clipchain.stats(state).items()}  # docs/logging.md's line
  assert logged and all(np.isfinite(v) for v in logged.values())


def _muon_pair(lr: float, max_norm: float):
  """The subset clip beside optax's Muon, and the clip written inside the AdamW branch."""
  ours = optax.chain(
    clipchain.clip_by_global_norm(max_norm, mask=not_matrix), optax.contrib.muon(lr)
  )
  # What optax.contrib.muon gives the leaves it does not orthogonalise: adamw with these settings.
  adamw = optax.adamw(lr, eps=1e-8, weight_decay=0.0, nesterov=True)
  hand = optax.partition(
    {
      "muon": optax.contrib.muon(lr),
      "adamw": optax.chain(clipchain.clip_by_global_norm(max_norm), adamw),
    },
    muon_labels,
  )
  return ours, hand


def test_the_subset_clip_beside_muon_equals_the_clip_inside_its_adamw_branch():
  ours, hand = _muon_pair(lr=0.02, max_norm=0.5)
  params = normal_tree(SHAPES, seed=0)
  grads = [normal_tree(SHAPES, seed=s, scale=2.0**s) for s in range(1, 6)]

  def make_step(tx):
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, g):
      updates, state = tx.update(g, state, params)
      return optax.apply_updates(params, updates), state

    return step

  p_ours, s_ours = params, ours.init(params)  # eager init, then a donated jit step
  p_hand, s_hand = jax.tree.map(jnp.copy, params), hand.init(params)
  step_ours, step_hand = make_step(ours), make_step(hand)
  for g in grads:
    p_ours, s_ours = step_ours(p_ours, s_ours, g)
    p_hand, s_hand = step_hand(p_hand, s_hand, g)
    assert_bits_equal(p_ours, p_hand)
    ours_stats, hand_stats = clipchain.stats(s_ours), clipchain.stats(s_hand)
    for key in ("norm", "clipped_norm", "clipped_fraction"):
      key = f"clip_by_global_norm/{key}"
      np.testing.assert_array_equal(ours_stats[key], hand_stats[key], err_msg=key)
    # ... and the subset clip also reports the whole gradient's norm, which the branch cannot.
    np.testing.assert_allclose(ours_stats["clip_by_global_norm/total_norm"], norm64(g), rtol=1e-6)
    assert "clip_by_global_norm/total_norm" not in hand_stats
  assert float(ours_stats["clip_by_global_norm/clipped_fraction"]) == 1.0  # it did clip


def test_inside_a_partition_the_mask_applies_to_the_branch():
  params = normal_tree(SHAPES, seed=0)
  g = normal_tree(SHAPES, seed=1, scale=3.0)
  labels = {"dense": "a", "out": "b", "scale": "a"}
  inner = clipchain.clip_by_layer_norm(0.5, mask=not_matrix)
  tx = optax.partition({"a": inner, "b": optax.identity()}, labels)
  updates, state = tx.update(g, tx.init(params), params)
  stats = clipchain.stats(state)
  assert sorted(k for k in stats if "/norm/" in k) == [
    "clip_by_layer_norm/norm/dense/bias",
    "clip_by_layer_norm/norm/scale",
  ]
  # Within the branch: its leaves are dense and scale, of which dense/kernel is passed through.
  np.testing.assert_allclose(
    stats["clip_by_layer_norm/total_norm"], norm64([g["dense"], g["scale"]]), rtol=1e-6
  )
  assert_bits_equal(updates["dense"]["kernel"], g["dense"]["kernel"])
  assert_bits_equal(updates["out"], g["out"])


def test_a_guard_decides_from_the_whole_norm_a_nan_outside_the_subset_skips_the_step():
  params = normal_tree(SHAPES, seed=0)
  g = normal_tree(SHAPES, seed=1)
  ours, _ = _muon_pair(lr=0.02, max_norm=0.5)
  tx = clipchain.skip_nonfinite(ours)
  state = tx.init(params)
  step = jax.jit(tx.update)
  _, state = step(g, state, params)
  bad = jax.tree.map(lambda x: x, g)
  bad["dense"]["kernel"] = bad["dense"]["kernel"].at[0, 0].set(jnp.nan)  # a Muon leaf
  updates, after = step(bad, state, params)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
  stats = clipchain.stats(after)
  assert int(stats["skip_nonfinite/total_skipped"]) == 1
  assert_bits_equal(after.inner_state, state.inner_state)


def test_flax_boxed_params_and_inject_hyperparams():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(4, kernel_init=nn.with_partitioning(nn.initializers.normal(), ("embed", "mlp")))(
        x
      )
      return nn.LayerNorm()(x)

  boxed = Model().init(jax.random.key(0), jnp.ones((1, 3)))["params"]
  grads = jax.tree.map(lambda x: 5 * jnp.ones_like(x), nn.meta.unbox(boxed))
  tx = optax.inject_hyperparams(clipchain.clip_by_global_norm, static_args=("mask",))(
    max_norm=1.0, mask=not_matrix
  )
  state = tx.init(boxed)  # boxes at init, plain arrays at update
  updates, state = jax.jit(tx.update)(grads, state)
  stats = clipchain.stats(state)
  mask = not_matrix(grads)
  np.testing.assert_allclose(stats["clip_by_global_norm/norm"], norm64(subset(grads, mask)))
  np.testing.assert_allclose(stats["clip_by_global_norm/total_norm"], norm64(grads), rtol=1e-6)
  assert_bits_equal(updates["Dense_0"]["kernel"], grads["Dense_0"]["kernel"])
  np.testing.assert_allclose(norm64(subset(updates, mask)), 1.0, rtol=1e-6)


def test_x64_keeps_the_state_float32():
  with jax.enable_x64(True):
    params = jax.tree.map(lambda x: x.astype(jnp.float64), normal_tree(SHAPES, seed=0))
    tx = clipchain.clip_by_global_norm(1.0, mask=not_matrix)
    state = tx.init(params)
    _, new = jax.jit(tx.update)(params, state, params)
    assert jax.tree.map(lambda x: x.dtype, new) == jax.tree.map(lambda x: x.dtype, state)
    assert new.total_norm.dtype == jnp.float32


@pytest.mark.parametrize(
  ("mask", "error", "match"),
  [
    ({"dense": 1}, TypeError, r"mask must hold Python booleans.*1 of type int"),
    ("dense", TypeError, r"mask must hold Python booleans.*'dense' of type str"),
    ({"dense": jnp.array(True)}, TypeError, r"mask must hold Python booleans.*ArrayImpl"),
    (True, ValueError, r"not the single boolean True.*static_args=\('mask',\)"),
  ],
)
def test_bad_masks_are_refused_at_construction(mask, error, match):
  with pytest.raises(error, match=match):
    clipchain.clip_by_global_norm(1.0, mask=mask)


def test_a_mask_callable_made_a_schedule_by_inject_hyperparams_is_refused():
  # Without static_args, inject_hyperparams calls the mask with the step count, which answers True.
  tx = optax.inject_hyperparams(clipchain.clip_by_global_norm)(max_norm=1.0, mask=not_matrix)
  with pytest.raises(ValueError, match=r"static_args=\('mask',\)"):
    tx.init(normal_tree(SHAPES, seed=0))


def test_a_mask_shaped_unlike_the_tree_is_refused_at_init_and_a_traced_one_at_update():
  params = normal_tree(SHAPES, seed=0)
  with pytest.raises(ValueError, match="mask must be shaped like the updates"):
    clipchain.clip_by_global_norm(1.0, mask={"dense": True}).init(params)
  traced = clipchain.clip_by_global_norm(1.0, mask=lambda t: jax.tree.map(jnp.isfinite, t))
  with pytest.raises(TypeError, match="the pytree the mask callable returned"):
    traced.init(params)

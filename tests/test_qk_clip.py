"""QK-Clip: the rescale against a float64 NumPy implementation of Kimi K2's rule, the Flax logits
against the attention computed by hand, sharded and shard_map runs against one device, and a
transformer trained at a high learning rate whose logits it keeps at the threshold."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from harness import flat, nest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import clipchain
from clipchain.study import tasks

RNG = np.random.default_rng(0)


def _normal(*shape):
  return RNG.normal(size=shape).astype(np.float32)


def _reference(params, updates, max_logits, tau, alpha, modules):
  """Kimi K2's QK-Clip in float64 on ``p + u``: ``gamma_h = min(1, tau / S_h)``, the query heads
  by ``gamma_h ** alpha``, each key head by ``(min over its query heads gamma) ** (1 - alpha)``
  (grouped-query attention); a non-finite ``S_h`` leaves the head alone. ``modules`` maps a
  module to its query and key leaf paths; heads on axis -2, stacked layers leading."""
  out = {path: np.float64(params[path]) + np.float64(updates[path]) for path in params}
  for module, (query_paths, key_paths) in modules.items():
    s = np.float64(max_logits[module])
    gamma = np.where(np.isfinite(s) & (s > tau), tau / np.where(np.isfinite(s), s, 1.0), 1.0)
    key_heads = params[key_paths[0]].shape[-2]
    group = gamma.reshape((*gamma.shape[:-1], key_heads, -1)).min(-1)
    for paths, factor in ((query_paths, gamma**alpha), (key_paths, group ** (1 - alpha))):
      for path in paths:
        x = out[path]
        lead = factor.shape[:-1]
        shape = lead + (1,) * (x.ndim - 2 - len(lead)) + (factor.shape[-1], 1)
        out[path] = x * factor.reshape(shape)
  return out


def _attention_params(prefix, d_in, q_heads, kv_heads, head_dim, lead=()):
  return {
    f"{prefix}/query/kernel": _normal(*lead, d_in, q_heads, head_dim),
    f"{prefix}/query/bias": _normal(*lead, q_heads, head_dim),
    f"{prefix}/key/kernel": _normal(*lead, d_in, kv_heads, head_dim),
    f"{prefix}/key/bias": _normal(*lead, kv_heads, head_dim),
    f"{prefix}/value/kernel": _normal(*lead, d_in, kv_heads, head_dim),
    f"{prefix}/out/kernel": _normal(*lead, q_heads, head_dim, d_in),
  }


def _modules(flat):
  modules: dict = {}
  for path in flat:
    m = re.search(r"(^|/)(query|key)/(kernel|bias)$", path)
    if m:
      q, k = modules.setdefault(path[: m.start()], ([], []))
      (q if m.group(2) == "query" else k).append(path)
  return modules


# One MHA module, one grouped-query module (4 query heads over 2 key heads) and one stacked
# (scanned) module of 3 layers, beside a plain leaf.
FLAT = {
  **_attention_params("mha", 6, 2, 2, 3),
  **_attention_params("decoder/gqa", 6, 4, 2, 3),
  **_attention_params("scanned/layers/attn", 6, 2, 2, 3, lead=(3,)),
  "embed/embedding": _normal(5, 6),
}
PARAMS = nest(FLAT)
LOGITS = {
  # above, below and at the threshold; not finite; negative; grouped: one head of a group binds
  "mha": np.float32([250.0, 40.0]),
  "decoder/gqa": np.float32([100.0, 400.0, np.nan, 101.0]),
  "scanned/layers/attn": np.float32([[1e4, -5.0], [np.inf, 99.0], [120.0, 130.0]]),
}


def _step(tx, params, updates, logits, state=None):
  state = tx.init(params) if state is None else state
  out, state = tx.update(updates, state, params, max_logits=logits)
  return optax.apply_updates(params, out), out, state


@pytest.mark.parametrize("alpha", [0.5, 0.0, 1.0, 0.3])
def test_equals_the_float64_rule_step_for_step(maybe_jit, alpha):
  tau = 100.0
  tx = clipchain.qk_clip(tau, alpha=alpha)
  step = maybe_jit(lambda p, u, s, logits: _step(tx, p, u, logits, s))
  params, state = PARAMS, tx.init(PARAMS)
  expected = {k: np.float64(v) for k, v in FLAT.items()}
  for t in range(4):
    updates = nest({k: 0.1 * _normal(*v.shape) for k, v in FLAT.items()})
    logits = {m: v * (1 + 0.5 * t) for m, v in LOGITS.items()}
    params, _, state = step(params, updates, state, logits)
    expected = _reference(expected, flat(updates), logits, tau, alpha, _modules(FLAT))
    for path, value in flat(params).items():
      np.testing.assert_allclose(value, expected[path], rtol=2e-6, atol=1e-6, err_msg=path)
  assert int(state.count) == 4


def test_heads_not_clipped_and_other_leaves_pass_through_bit_for_bit():
  updates = nest({k: _normal(*v.shape) for k, v in FLAT.items()})
  _, out, _ = _step(clipchain.qk_clip(100.0), PARAMS, updates, LOGITS)
  flat_out, flat_in = flat(out), flat(updates)
  for path in ("embed/embedding", "mha/value/kernel", "mha/out/kernel"):
    np.testing.assert_array_equal(flat_out[path], flat_in[path])
  # mha head 1 (40 < tau): its query and key columns untouched; head 0 rescaled.
  q_out, q_in = flat_out["mha/query/kernel"], flat_in["mha/query/kernel"]
  np.testing.assert_array_equal(q_out[:, 1], q_in[:, 1])
  assert not np.array_equal(q_out[:, 0], q_in[:, 0])
  # gqa: key head 0 serves query heads 0 (at tau) and 1 (400): shrunk; key head 1 serves a NaN
  # logit and 101: shrunk by the 101's factor only.
  k_out, k_in = flat_out["decoder/gqa/key/kernel"], flat_in["decoder/gqa/key/kernel"]
  assert not np.array_equal(k_out[:, 0], k_in[:, 0])
  np.testing.assert_array_equal(
    flat_out["decoder/gqa/query/kernel"][:, 2], flat_in["decoder/gqa/query/kernel"][:, 2]
  )


def test_statistics():
  _, _, state = _step(clipchain.qk_clip(100.0), PARAMS, nest(FLAT), LOGITS)
  s = clipchain.stats(state)
  assert float(s["qk_clip/max_logit/mha"]) == 250.0
  assert float(s["qk_clip/max_logit/scanned/layers/attn"]) == np.inf
  assert np.isnan(float(s["qk_clip/max_logit/decoder/gqa"]))
  # Clipped query heads: mha 1 of 2, gqa 2 of 4 (400, 101), scanned 3 of 6 (1e4, 120, 130).
  assert float(s["qk_clip/clipped_fraction"]) == pytest.approx(6 / 12)
  assert set(s) == {
    "qk_clip/max_logit",
    "qk_clip/clipped_fraction",
    "qk_clip/max_logit/mha",
    "qk_clip/max_logit/decoder/gqa",
    "qk_clip/max_logit/scanned/layers/attn",
  }


def test_statistics_per_run_under_vmap():
  params = nest(_attention_params("attn", 4, 2, 2, 3))
  tx = clipchain.qk_clip(10.0)

  def run(logits):
    _, _, state = _step(tx, params, params, {"attn": logits})
    return clipchain.stats(state)

  s = jax.vmap(run)(jnp.array([[20.0, 5.0], [1.0, 2.0]]))
  np.testing.assert_array_equal(s["qk_clip/max_logit"], [20.0, 2.0])
  np.testing.assert_array_equal(s["qk_clip/clipped_fraction"], [0.5, 0.0])


def test_inject_hyperparams_eager_init_and_a_donated_jit_step():
  tau, alpha = 100.0, 0.25
  plain = optax.chain(optax.adam(1e-2), clipchain.qk_clip(tau, alpha=alpha))
  injected = optax.chain(
    optax.adam(1e-2), optax.inject_hyperparams(clipchain.qk_clip)(threshold=tau, alpha=alpha)
  )
  updates = nest({k: _normal(*v.shape) for k, v in FLAT.items()})
  results = []
  for tx in (plain, injected):
    params = jax.tree.map(jnp.array, PARAMS)
    state = tx.init(params)

    def step(p, s, g, logits, tx=tx):
      u, s = tx.update(g, s, p, max_logits=logits)
      return optax.apply_updates(p, u), s

    step = jax.jit(step, donate_argnums=(0, 1))
    for _ in range(2):
      params, state = step(params, state, updates, LOGITS)
    results.append((params, clipchain.stats(state)))
  jax.tree.map(np.testing.assert_array_equal, results[0][0], results[1][0])
  np.testing.assert_array_equal(
    results[0][1]["qk_clip/clipped_fraction"], results[1][1]["qk_clip/clipped_fraction"]
  )


def test_x64_and_bfloat16_params():
  params = nest(_attention_params("attn", 4, 2, 2, 3))
  logits = {"attn": jnp.array([400.0, 1.0])}
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
    new, _, state = _step(clipchain.qk_clip(100.0), p64, jax.tree.map(jnp.zeros_like, p64), logits)
    assert new["attn"]["query"]["kernel"].dtype == jnp.float64
    assert state.max_logit.dtype == jnp.float32
    np.testing.assert_allclose(
      new["attn"]["query"]["kernel"][:, 0], p64["attn"]["query"]["kernel"][:, 0] * 0.5
    )
  bf = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
  new, _, _ = _step(clipchain.qk_clip(100.0), bf, jax.tree.map(jnp.zeros_like, bf), logits)
  assert new["attn"]["key"]["kernel"].dtype == jnp.bfloat16
  np.testing.assert_allclose(
    np.float32(new["attn"]["key"]["kernel"][:, 0]),
    np.float32(bf["attn"]["key"]["kernel"][:, 0]) * 0.5,
    rtol=1e-2,
  )


def test_boxed_flax_params():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.MultiHeadDotProductAttention(
        2,
        kernel_init=nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), ("embed", "heads", "kv")
        ),
        name="attn",
      )(x)

  boxed = Model().init(jax.random.key(0), jnp.ones((1, 3, 4)))["params"]
  assert isinstance(boxed["attn"]["query"]["kernel"], nn.LogicallyPartitioned)
  tx = clipchain.qk_clip(1.0)
  state = tx.init(boxed)
  params = nn.meta.unbox(boxed)
  out, _ = tx.update(params, state, params, max_logits={"attn": jnp.array([4.0, 0.5])})
  new = optax.apply_updates(params, out)
  np.testing.assert_allclose(
    new["attn"]["query"]["kernel"][:, 0],
    2 * params["attn"]["query"]["kernel"][:, 0] * 0.5,
    rtol=1e-6,
  )


# --------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    ({"threshold": 0.0}, ValueError, "threshold"),
    ({"threshold": -1.0}, ValueError, "threshold"),
    ({"threshold": float("nan")}, ValueError, "threshold"),
    ({"threshold": "100"}, TypeError, "threshold"),
    ({"alpha": 1.5}, ValueError, "alpha"),
    ({"alpha": True}, TypeError, "alpha"),
    ({"query": 5}, TypeError, "query"),
    ({"key": "("}, ValueError, "key"),
    ({"head_axis": 1.0}, TypeError, "head_axis"),
    ({"name": ""}, ValueError, "name"),
    ({"axis_name": 3}, TypeError, "axis_name"),
  ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, error, match):
  with pytest.raises(error, match=match):
    clipchain.qk_clip(**kwargs)


@pytest.mark.parametrize(
  "leaves, kwargs, match",
  [
    ({"dense/kernel": np.zeros((2, 2))}, {}, "no leaf path matches"),
    ({"attn/query/kernel": np.zeros((4, 2, 3))}, {}, "key leaves missing"),
    (_attention_params("attn", 4, 3, 2, 3), {}, "multiple of the key heads"),
    (_attention_params("attn", 4, 2, 2, 3), {"head_axis": 5}, "head_axis=5"),
    (
      _attention_params("attn", 4, 2, 2, 3),
      {"query": "kernel$", "key": "key/kernel$"},
      "matches both",
    ),
  ],
)
def test_trees_it_cannot_clip_are_refused_at_init(leaves, kwargs, match):
  with pytest.raises(ValueError, match=match):
    clipchain.qk_clip(**kwargs).init(nest(leaves))


def test_update_refuses_what_would_give_a_wrong_number():
  params = nest(_attention_params("attn", 4, 2, 2, 3))
  tx = clipchain.qk_clip()
  state = tx.init(params)
  with pytest.raises(ValueError, match="max_logits="):
    tx.update(params, state, params)
  with pytest.raises(ValueError, match="pass params"):
    tx.update(params, state, None, max_logits={"attn": jnp.ones(2)})
  with pytest.raises(ValueError, match=r"no entry for the attention modules \['attn'\]"):
    tx.update(params, state, params, max_logits={"block/attn": jnp.ones(2)})
  with pytest.raises(ValueError, match="not found: \\['other'\\]"):
    tx.update(params, state, params, max_logits={"attn": jnp.ones(2), "other": jnp.ones(2)})
  with pytest.raises(ValueError, match="does not fit the leaf"):
    tx.update(params, state, params, max_logits={"attn": jnp.ones((5, 2))})
  with pytest.raises(ValueError, match="query heads"):
    tx.update(params, state, params, max_logits={"attn": jnp.ones(3)})
  with pytest.raises(TypeError, match="mapping"):
    tx.update(params, state, params, max_logits=[jnp.ones(2)])


def test_non_finite_logits_leave_the_parameters_finite():
  params = nest(_attention_params("attn", 4, 2, 2, 3))
  new, _, _ = _step(clipchain.qk_clip(), params, params, {"attn": jnp.array([jnp.nan, jnp.inf])})
  for leaf in jax.tree.leaves(new):
    assert np.all(np.isfinite(leaf))
  np.testing.assert_array_equal(
    new["attn"]["query"]["kernel"], 2 * params["attn"]["query"]["kernel"]
  )


# --------------------------------------------------------------------------------------------------
# The Flax logits


class _Block(nn.Module):
  heads: int = 2

  @nn.compact
  def __call__(self, x, mask=None):
    attn = nn.MultiHeadDotProductAttention(
      self.heads, attention_fn=clipchain.attention.max_logit_attention, name="attn"
    )
    return attn(x, mask=mask, sow_weights=True)


def _logits_by_hand(p, x, mask):
  x = np.float64(x)
  q = np.einsum("btd,dhk->bthk", x, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("btd,dhk->bthk", x, p["key"]["kernel"]) + p["key"]["bias"]
  logits = np.einsum("bqhd,bkhd->bhqk", q / np.sqrt(q.shape[-1]), k)
  return np.where(mask, logits, -np.inf).max(axis=(0, 2, 3))


def test_the_sown_logits_are_the_attention_logits_and_the_output_is_flaxs():
  x = jax.random.normal(jax.random.key(1), (3, 5, 8))
  lengths = jnp.array([5, 2, 4])
  padding = jnp.arange(5)[None, :] < lengths[:, None]
  mask = nn.combine_masks(nn.make_causal_mask(padding), nn.make_attention_mask(padding, padding))
  variables = _Block().init(jax.random.key(0), x, mask)
  y, state = _Block().apply(variables, x, mask, mutable=["intermediates"])
  logits = clipchain.attention.max_logits(state)
  np.testing.assert_allclose(
    logits["attn"], _logits_by_hand(variables["params"]["attn"], x, np.asarray(mask)), rtol=1e-5
  )
  plain = nn.MultiHeadDotProductAttention(2, name="attn")
  np.testing.assert_array_equal(
    y, plain.apply({"params": variables["params"]["attn"]}, x, mask=mask)
  )


def test_scanned_layers_keep_their_axis_and_paths_match_the_params():
  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      scanned = nn.scan(
        lambda block, carry, _: (carry + block(carry), None),
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True},
        length=3,
      )
      x, _ = scanned(_Block(name="layers"), x, None)
      return x

  x = jax.random.normal(jax.random.key(1), (2, 4, 6))
  variables = Stack().init(jax.random.key(0), x)
  _, state = Stack().apply(variables, x, mutable=["intermediates"])
  logits = clipchain.attention.max_logits(state)
  assert list(logits) == ["layers/attn"] and logits["layers/attn"].shape == (3, 2)
  params = variables["params"]
  tx = clipchain.qk_clip(0.5)
  new, _, _ = _step(tx, params, jax.tree.map(jnp.zeros_like, params), logits)
  kernel = params["layers"]["attn"]["query"]["kernel"]
  gamma = np.minimum(1.0, 0.5 / np.asarray(logits["layers/attn"]))
  np.testing.assert_allclose(
    new["layers"]["attn"]["query"]["kernel"], kernel * np.sqrt(gamma)[:, None, :, None], rtol=1e-6
  )


def test_a_module_called_twice_gives_the_larger_logit_and_none_sown_is_an_error():
  class Twice(nn.Module):
    @nn.compact
    def __call__(self, x):
      block = _Block(name="block")
      return block(x) + block(3 * x)

  x = jax.random.normal(jax.random.key(1), (2, 4, 6))
  variables = Twice().init(jax.random.key(0), x)
  _, state = Twice().apply(variables, x, mutable=["intermediates"])
  calls = state["intermediates"]["block"]["attn"]["max_logits"]
  np.testing.assert_array_equal(
    clipchain.attention.max_logits(state)["block/attn"], np.maximum(*calls)
  )
  with pytest.raises(ValueError, match="sow_weights=True"):
    clipchain.attention.max_logits({"intermediates": {}})


# --------------------------------------------------------------------------------------------------
# Devices


def _mesh(shape, names):
  return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Explicit,) * len(names))


def test_jit_with_fsdp_shardings_equals_one_device():
  params = nest(_attention_params("attn", 8, 4, 2, 3))
  updates = jax.tree.map(lambda x: 0.1 * x, params)
  logits = {"attn": jnp.array([300.0, 20.0, 150.0, 90.0])}
  tx = clipchain.qk_clip()
  expected, _, _ = _step(tx, params, updates, logits)
  mesh = jax.make_mesh((8,), ("fsdp",))

  def shard(x):  # FSDP: each parameter split along its first axis where it divides
    spec = P("fsdp") if x.shape[0] % 8 == 0 else P()
    return jax.device_put(x, NamedSharding(mesh, spec))

  sharded = jax.tree.map(shard, params)
  step = jax.jit(lambda p, u, s, logit: _step(tx, p, u, logit, s)[0])
  got = step(sharded, jax.tree.map(shard, updates), tx.init(sharded), logits)
  assert got["attn"]["query"]["kernel"].sharding.spec[0] == "fsdp"
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, expected)


def test_shard_map_over_heads_and_over_the_batch():
  from jax import shard_map

  params = nest(_attention_params("attn", 6, 4, 4, 3))
  updates = jax.tree.map(lambda x: 0.1 * x, params)
  logits = jnp.array([300.0, 20.0, 150.0, 90.0])
  tx = clipchain.qk_clip()
  expected, _, _ = _step(tx, params, updates, {"attn": logits})

  # Heads split over "model": each device rescales its own heads from its own logits.
  mesh = jax.make_mesh((4,), ("model",))
  head_spec = {
    "query": {"kernel": P(None, "model"), "bias": P("model")},
    "key": {"kernel": P(None, "model"), "bias": P("model")},
    "value": {"kernel": P()},
    "out": {"kernel": P()},
  }
  specs = {"attn": head_spec}

  def by_heads(p, u, logit):
    return _step(tx, p, u, {"attn": logit})[0]

  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  got = jax.jit(
    shard_map(by_heads, mesh=mesh, in_specs=(specs, specs, P("model")), out_specs=specs)
  )(jax.tree.map(put, params, specs), jax.tree.map(put, updates, specs), put(logits, P("model")))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, expected)

  # The batch split over "data": each device saw part of the batch, so its largest logits are
  # partial; axis_name takes the largest across devices.
  mesh = jax.make_mesh((4,), ("data",))
  partial = jnp.stack([logits * f for f in (0.1, 1.0, 0.5, 0.2)])  # device 1 saw the largest
  batch_tx = clipchain.qk_clip(axis_name="data")

  def by_batch(p, u, logit):
    new, _, state = _step(batch_tx, p, u, {"attn": logit[0]})
    return new, clipchain.stats(state)["qk_clip/max_logit"]

  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  got, max_logit = jax.jit(
    shard_map(by_batch, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=(P(), P()))
  )(params, updates, put(partial, P("data")))
  assert float(max_logit) == 300.0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, expected)


# --------------------------------------------------------------------------------------------------
# Training


def test_a_transformer_at_a_high_learning_rate_keeps_its_logits_at_the_threshold():
  """The study's ``lm`` task (no QK-norm) with Adam at lr 0.03: without QK-Clip the largest logit
  grows past 3 tau (past 8 tau at step 300); with it (tau = 100, Kimi K2's) it stays within 30 %
  of tau at every step (the excess: one step's growth after the last rescale); the loss is lower."""
  task, model, tau = tasks.lm(), tasks.TinyTransformerLM(), 100.0
  params = task.init(jax.random.key(0))

  def loss(params, tokens):
    logits, sown = model.apply({"params": params}, tokens[:, :-1], mutable=["intermediates"])
    losses = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1)[..., 0]
    return jnp.mean(losses[:, 1:]), clipchain.attention.max_logits(sown)

  def train(tx, steps=300):
    def step(carry, t):
      p, s = carry
      (value, logits), g = jax.value_and_grad(loss, has_aux=True)(
        p, task.batches(jax.random.key(1), t)
      )
      u, s = tx.update(g, s, p, max_logits=logits)
      largest = jnp.max(jnp.stack([v.max() for v in logits.values()]))
      return (optax.apply_updates(p, u), s), (value, largest)

    _, (losses, largest) = jax.jit(
      lambda: jax.lax.scan(step, (params, tx.init(params)), jnp.arange(steps))
    )()
    return np.asarray(losses), np.asarray(largest)

  # A chain passes the extra argument on to the transforms that take one.
  loss_without, logits_without = train(optax.chain(optax.adam(0.03)))
  loss_with, logits_with = train(optax.chain(optax.adam(0.03), clipchain.qk_clip(tau)))
  assert logits_without[-50:].min() > 3 * tau
  assert logits_with.max() <= 1.3 * tau
  assert np.median(logits_with[-50:]) <= 1.1 * tau
  assert loss_with[-50:].mean() < loss_without[-50:].mean()

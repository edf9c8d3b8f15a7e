"""MuonClip: Muon with QK-Clip after the step, on a scanned Flax decoder without QK-norm.

Without a QK-norm, attention logits ``q . k / sqrt(d)`` can grow without bound at high learning
rates until the softmax saturates and training stalls or spikes, the instability Kimi K2 met with
Muon. QK-Clip rescales, after the optimizer's step, the query and key projections of every head
whose largest logit in the forward pass was above ``tau``, so that it comes back to ``tau``. Here:

* the attention modules are Flax's own, given ``clipchain.attention.max_logit_attention`` as their
  ``attention_fn`` (called with ``sow_weights=True``), which sows each head's largest logit;
* the layers are stacked by ``nn.scan``, so the logits come as ``(layers, heads)`` and each layer's
  heads are rescaled on their own;
* ``optax.contrib.muon`` orthogonalises each projection as the matrix it is (``(in, heads x dim)``
  for query, key and value, ``(heads x dim, out)`` for the output), and ``clipchain.qk_clip`` goes
  after it in the chain, given the logits with ``update(..., max_logits=...)``;
* ``clipchain.stats`` logs the largest logit and the share of heads clipped from the state.

  python examples/qk_clip_transformer.py
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers

import clipchain

VOCAB, LENGTH, WIDTH, HEADS, LAYERS = 16, 12, 32, 4, 2


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    attention = nn.MultiHeadDotProductAttention(
      HEADS, attention_fn=clipchain.attention.max_logit_attention, name="attn"
    )
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    x = x + attention(nn.LayerNorm()(x), mask=mask, sow_weights=True)
    return x + nn.Dense(WIDTH)(nn.gelu(nn.Dense(4 * WIDTH)(nn.LayerNorm()(x)))), None


class Decoder(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, WIDTH)(tokens)
    layers = nn.scan(
      Block,
      variable_axes={"params": 0, "intermediates": 0},  # per-layer params and logits, stacked
      split_rngs={"params": True},
      length=LAYERS,
    )
    x, _ = layers(name="layers")(x, None)
    return nn.Dense(VOCAB)(nn.LayerNorm()(x))


def muon_dimensions(params):
  """How Muon sees each leaf as a matrix: attention projections whole, other matrices as they
  are, everything else to its AdamW (``None``). The leading axis of ``layers`` is the stack."""

  def dims(path, x):
    names = [getattr(k, "key", None) for k in path]
    stacked = "layers" in names
    lead = 1 if stacked else 0
    if names[-1] != "kernel":
      return None
    if names[-2] in ("query", "key", "value"):
      return MuonDimensionNumbers(reduction_axis=lead, output_axis=(lead + 1, lead + 2))
    if names[-2] == "out":
      return MuonDimensionNumbers(reduction_axis=(lead, lead + 1), output_axis=lead + 2)
    if x.ndim - lead == 2:
      return MuonDimensionNumbers(reduction_axis=lead, output_axis=lead + 1)
    return None

  return jax.tree_util.tree_map_with_path(dims, params)


def make_tx(params, lr: float, tau: float | None) -> optax.GradientTransformationExtraArgs:
  muon = optax.contrib.muon(lr, muon_weight_dimension_numbers=muon_dimensions(params))
  # A chain passes max_logits on to the transforms that take it.
  return optax.chain(muon) if tau is None else optax.chain(muon, clipchain.qk_clip(tau))


def loss_fn(params, tokens):
  logits, sown = Decoder().apply({"params": params}, tokens[:, :-1], mutable=["intermediates"])
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
  return jnp.mean(losses), clipchain.attention.max_logits(sown)


def batch(step: int) -> jax.Array:
  """Sequences that repeat a random 3-token motif: attention to 3 tokens back solves them."""
  key = jax.random.fold_in(jax.random.key(1), step)
  motif = jax.random.randint(key, (32, 3), 0, VOCAB)
  return jnp.tile(motif, (1, LENGTH // 3 + 1))[:, : LENGTH + 1]


def main(steps: int = 100, lr: float = 0.1, tau: float | None = 30.0) -> list[dict[str, float]]:
  params = Decoder().init(jax.random.key(0), batch(0)[:, :-1])["params"]
  tx = make_tx(params, lr, tau)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, tokens):
    (loss, max_logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens)
    updates, opt_state = tx.update(grads, opt_state, params, max_logits=max_logits)
    largest = jnp.max(max_logits["layers/attn"])
    metrics = {"loss": loss, "largest_logit": largest, **clipchain.stats(opt_state)}
    return optax.apply_updates(params, updates), opt_state, metrics

  log = []
  for t in range(steps):
    params, opt_state, metrics = step(params, opt_state, batch(t))
    log.append({k: float(v) for k, v in metrics.items()})
  last = log[-1]
  print(
    f"tau={tau}: loss {last['loss']:.3f}, largest logit over the run "
    f"{max(e['largest_logit'] for e in log):.1f}, heads clipped at the last step "
    f"{last.get('qk_clip/clipped_fraction', 0.0):.2f}"
  )
  return log


if __name__ == "__main__":
  main(tau=None)
  main()

"""Per-layer clipping and logging on a decoder whose blocks are stacked by ``nn.scan``.

As MaxText, Levanter and AXLearn build their models: every block's kernels live in one leaf with a
leading layer axis, the parameters are boxed by ``nn.LogicallyPartitioned`` with that axis named
``"layers"``, and the step runs under ``jit`` with FSDP shardings over every available device.
clipchain reads the metadata at ``init``: each slice of a stacked leaf is a layer of its own, so
ZClip runs per scanned layer and ``monitor`` logs every layer's gradient norm
(``monitor/norm/params/blocks/mlp/wi/kernel/3``), with no ``stacked_axes=`` to write. A guard skips
a step whose gradient is not finite.

  python examples/scanned_transformer.py
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding

import clipchain

VOCAB, WIDTH, DEPTH, LENGTH = 32, 16, 4, 8
# Logical axis names to mesh axes: the embedding dimension is split over "fsdp".
RULES = (("embed", "fsdp"), ("mlp", None), ("vocab", None), ("layers", None))


def dense(features: int, names: tuple[str, str], name: str) -> nn.Dense:
  init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), names)
  return nn.Dense(features, use_bias=False, kernel_init=init, name=name)


class Block(nn.Module):
  """A pre-norm MLP block with causal token mixing (one matmul over positions)."""

  @nn.compact
  def __call__(self, x, _):
    # Every parameter of a scanned block needs its metadata: a leaf without a box has no
    # "layers" axis to read (else say it: zclip(..., stacked_axes={"blocks/": 1})).
    scale = nn.with_logical_partitioning(nn.initializers.ones, ("embed",))
    h = nn.RMSNorm(scale_init=scale, name="norm")(x)
    causal = jnp.tril(jnp.ones((LENGTH, LENGTH))) / jnp.arange(1, LENGTH + 1)[:, None]
    h = jnp.einsum("ts,bsd->btd", causal, h)
    h = dense(WIDTH, ("mlp", "embed"), "wo")(nn.gelu(dense(4 * WIDTH, ("embed", "mlp"), "wi")(h)))
    return x + h, None


class Decoder(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(
      VOCAB, WIDTH, embedding_init=nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ("vocab", "embed")
      ), name="embed",
    )  # fmt: skip
    blocks = nn.scan(
      Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=DEPTH,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )  # fmt: skip
    x, _ = blocks(name="blocks")(embed(tokens), None)
    return dense(VOCAB, ("embed", "vocab"), "head")(nn.RMSNorm(name="final_norm")(x))


def make_optimizer() -> optax.GradientTransformation:
  return clipchain.skip_nonfinite(
    optax.chain(
      clipchain.monitor(),  # per-layer norms of the raw gradients
      clipchain.zclip(granularity="layer", warmup_steps=5),  # ZClip per scanned layer
      optax.adamw(3e-3),
    )
  )


def main(steps: int = 12, nonfinite_step: int = 9) -> tuple[list[dict], list[dict]]:
  """Trains ``steps`` steps on random token sequences; the batch of ``nonfinite_step`` makes the
  gradient NaN. Returns each step's statistics and each step's gradients as float64 NumPy."""
  mesh = jax.make_mesh((len(jax.devices()),), ("fsdp",), axis_types=(AxisType.Auto,))
  model, tx = Decoder(), make_optimizer()
  tokens = jax.random.randint(jax.random.key(0), (steps, 2, LENGTH + 1), 0, VOCAB)
  # As Flax's partitioning guide: the parameters stay boxed (LogicallyPartitioned) throughout,
  # created already sharded; their gradients and the optimizer's moments are boxed alike.
  init = lambda key: model.init(key, tokens[0, :, :-1])
  abstract = jax.eval_shape(init, jax.random.key(1))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, RULES)
  params = jax.jit(init, out_shardings=shardings)(jax.random.key(1))
  opt_state = tx.init(params)  # eager; the "layers" axis of the metadata is stacked

  def loss_fn(params, batch, poison):
    logits = model.apply(params, batch[:, :-1])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
    return loss * poison

  def train_step(params, opt_state, batch, poison):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, poison)
    updates, opt_state = tx.update(grads, opt_state, params)
    stats = {"loss": loss, **clipchain.stats(opt_state)}
    return optax.apply_updates(params, updates), opt_state, stats, grads

  train_step = jax.jit(train_step, donate_argnums=(0, 1))
  logs, all_grads = [], []
  for i in range(steps):
    poison = jnp.float32(np.nan if i == nonfinite_step else 1.0)
    params, opt_state, stats, grads = train_step(params, opt_state, tokens[i], poison)
    logs.append({k: np.asarray(v) for k, v in stats.items()})
    all_grads.append(jax.tree.map(lambda g: np.asarray(g, np.float64), nn.unbox(grads)))
    wi = [float(logs[-1][f"monitor/norm/params/blocks/wi/kernel/{n}"]) for n in range(DEPTH)]
    print(
      f"step {i:2d} loss {float(logs[-1]['loss']):7.4f} skipped "
      f"{int(logs[-1]['skip_nonfinite/skipped'])} wi norm per layer "
      + " ".join(f"{n:.4f}" for n in wi)
    )
  kernel = nn.unbox(params)["params"]["blocks"]["wi"]["kernel"]
  assert isinstance(kernel.sharding, NamedSharding) and kernel.sharding.spec[1] == "fsdp"
  return logs, all_grads


if __name__ == "__main__":
  main()

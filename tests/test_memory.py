"""No gradient-sized temporary: XLA's buffer assignment for a donated Adam step, per transform.

A structural check, independent of timing: ``compiled.memory_analysis()`` of the step a training
loop runs, at a size where one gradient-sized buffer dwarfs every per-group array.
"""

from __future__ import annotations

import jax
import optax
import pytest

import clipchain

LEAVES, SHAPE = 4, (1024, 512)  # 2 MiB per leaf

WITHOUT_TEMPORARY = {
  "clip_by_global_norm": lambda: clipchain.clip_by_global_norm(1.0),
  "clip_by_layer_norm": lambda: clipchain.clip_by_layer_norm(1.0),
  "clip_by_block_rms": lambda: clipchain.clip_by_block_rms(1.0),
  # Per-unit norms: the total must not become a second full reduction of each leaf.
  "adaptive_grad_clip": lambda: clipchain.adaptive_grad_clip(0.01),
  "zclip_unit": lambda: clipchain.zclip(granularity="unit"),
  "quantile_clip_unit": lambda: clipchain.quantile_clip(granularity="unit"),
  "adagc_unit": lambda: clipchain.adagc(granularity="unit"),
  "zclip_layer": lambda: clipchain.zclip(granularity="layer"),
  "adagc": lambda: clipchain.adagc(),
  "autoclip": lambda: clipchain.autoclip(),
}


def tree(seed):
  key = jax.random.key(seed)  # float32 leaves: 4 bytes a value
  return {f"w{i}": jax.random.normal(jax.random.fold_in(key, i), SHAPE) for i in range(LEAVES)}


def temporary_bytes(tx) -> int:
  params, grads = tree(1), tree(0)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), grads).compile()
  return compiled.memory_analysis().temp_size_in_bytes


GRAD_BYTES = LEAVES * 4 * SHAPE[0] * SHAPE[1]


@pytest.mark.parametrize("name", WITHOUT_TEMPORARY)
def test_no_gradient_sized_temporary(name):
  tx = optax.chain(WITHOUT_TEMPORARY[name](), optax.adam(1e-3))
  # Within 1 MiB of Adam's own (none): per-group arrays and histories, not a leaf-sized buffer.
  assert temporary_bytes(tx) < 2**20


def test_the_check_detects_a_gradient_sized_temporary():
  """optax's global clip materialises ``t / g * c``: one buffer the size of the gradients."""
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
  assert temporary_bytes(tx) >= GRAD_BYTES

"""The largest attention logit of every head, collected from a Flax forward pass for QK-Clip.

Flax's ``nn.MultiHeadDotProductAttention`` takes an ``attention_fn``; the one here is Flax's own
``nn.dot_product_attention`` (same softmax, dropout and precision), which also sows, per head, the
largest pre-softmax logit among the positions the mask lets through into the module's
``"intermediates"`` collection. :func:`max_logits` turns that collection into the
``{module path: (..., heads)}`` mapping :func:`clipchain.qk_clip` takes.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

#: The name under which the largest logits are sown in the ``"intermediates"`` collection.
SOWN_NAME = "max_logits"


def max_logit_attention(
  query: jax.Array,
  key: jax.Array,
  value: jax.Array,
  bias: jax.Array | None = None,
  mask: jax.Array | None = None,
  broadcast_dropout: bool = True,
  dropout_rng: jax.Array | None = None,
  dropout_rate: float = 0.0,
  deterministic: bool = False,
  dtype: Any = None,
  precision: Any = None,
  module: nn.Module | None = None,
  force_fp32_for_softmax: bool = False,
  einsum_dot_general: Any = None,
  qk_attn_weights_einsum: Any = None,
  attn_weights_value_einsum: Any = None,
) -> jax.Array:
  """Flax's ``nn.dot_product_attention`` that also sows each head's largest logit.

  Pass it as ``attention_fn`` to ``nn.MultiHeadDotProductAttention`` and call the module with
  ``sow_weights=True`` (which is how Flax hands an ``attention_fn`` its module; the attention
  weights themselves are not sown). The module's ``"intermediates"`` then hold, under
  ``"max_logits"``, a ``(heads,)`` float32 array: per head, the largest logit
  ``q . k / sqrt(d)`` (plus ``bias``) over the batch and every query and key position the mask
  keeps (``-inf`` for a head with none). Apply the model with ``mutable=["intermediates"]`` to
  get them; otherwise nothing is sown and nothing is computed for them.

  Arguments are those of ``flax.linen.dot_product_attention``; the output is the same.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, clipchain
    >>> attn = nn.MultiHeadDotProductAttention(
    ...     2, attention_fn=clipchain.attention.max_logit_attention)
    >>> x = jnp.ones((1, 3, 4))
    >>> variables = attn.init(jax.random.key(0), x, sow_weights=True)
    >>> y, state = attn.apply(variables, x, sow_weights=True, mutable=["intermediates"])
    >>> clipchain.attention.max_logits(state["intermediates"])[""].shape
    (2,)
  """
  recorded = []
  # Flax's own default einsum, for whichever of the two the caller did not give.
  default_einsum = functools.partial(
    jnp.einsum, precision=precision, _dot_general=einsum_dot_general or jax.lax.dot_general
  )
  qk_attn_weights_einsum = qk_attn_weights_einsum or default_einsum
  attn_weights_value_einsum = attn_weights_value_einsum or default_einsum

  def recording_einsum(*args, **kwargs):
    out = qk_attn_weights_einsum(*args, **kwargs)
    recorded.append(out)
    return out

  out = nn.dot_product_attention(
    query,
    key,
    value,
    bias=bias,
    mask=mask,
    broadcast_dropout=broadcast_dropout,
    dropout_rng=dropout_rng,
    dropout_rate=dropout_rate,
    deterministic=deterministic,
    dtype=dtype,
    module=None,
    force_fp32_for_softmax=force_fp32_for_softmax,
    qk_attn_weights_einsum=recording_einsum,
    attn_weights_value_einsum=attn_weights_value_einsum,
  )
  # Without a module (called with sow_weights=False) there is nowhere to sow: max_logits and
  # qk_clip then say which modules gave nothing.
  if module is not None and module.is_mutable_collection("intermediates"):
    # The logits Flax's softmax saw (before bias and mask), shape (batch..., heads, q, k).
    logits = recorded[0].astype(jnp.float32)
    if bias is not None:
      logits = logits + bias.astype(jnp.float32)
    if mask is not None:
      logits = jnp.where(mask, logits, -jnp.inf)
    heads_axis = logits.ndim - 3
    per_head = jnp.max(logits, axis=tuple(a for a in range(logits.ndim) if a != heads_axis))
    module.sow("intermediates", SOWN_NAME, per_head)
  return out


def max_logits(intermediates: Mapping) -> dict[str, jax.Array]:
  """The ``max_logits=`` mapping of :func:`clipchain.qk_clip`, from a Flax ``"intermediates"``
  collection: ``{module path: (..., heads)}``.

  Each module that sowed with :func:`max_logit_attention` is named by its path relative to the
  collection, the same as its parameters' path relative to ``variables["params"]``; stacked
  (``nn.scan``) layers keep their leading axis. A module called several times in a forward pass
  gives the largest logit over its calls.

  Args:
    intermediates: the ``"intermediates"`` collection returned by
      ``model.apply(..., mutable=["intermediates"])`` (or the whole returned mapping of mutable
      collections, which holds it).

  Returns:
    A ``dict`` from module paths to float32 arrays.
  """
  if "intermediates" in intermediates and isinstance(intermediates["intermediates"], Mapping):
    intermediates = intermediates["intermediates"]
  out: dict[str, jax.Array] = {}

  def walk(node: Mapping, path: tuple[str, ...]) -> None:
    for name, child in node.items():
      if name == SOWN_NAME and isinstance(child, tuple):
        calls = [jnp.asarray(c, jnp.float32) for c in child]
        out["/".join(path)] = functools.reduce(jnp.maximum, calls)
      elif isinstance(child, Mapping):
        walk(child, (*path, str(name)))

  walk(intermediates, ())
  if not out:
    raise ValueError(
      "max_logits found no sown logits: use clipchain.attention.max_logit_attention as the "
      "attention modules' attention_fn, call them with sow_weights=True and apply the model with "
      f"mutable=['intermediates'] (the collection has the keys {sorted(map(str, intermediates))})."
    )
  return out

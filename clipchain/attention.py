"""Attention logits for :func:`clipchain.qk_clip`: a Flax ``attention_fn`` that sows each head's
largest logit, and the function that collects them from a forward pass."""

from clipchain._src.attention import max_logit_attention, max_logits

__all__ = ["max_logit_attention", "max_logits"]

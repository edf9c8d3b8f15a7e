"""AdaGC: clip each layer to a multiple of an EMA of its own clipped norm (Wang et al. 2025)."""

from __future__ import annotations

import optax

from clipchain._src.clip_norm import clip_norm
from clipchain._src.distributed import AxisName
from clipchain._src.granularity import GranularityLike, as_granularity
from clipchain._src.masking import MaskLike
from clipchain._src.stacking import StackedSpec
from clipchain._src.thresholds.ema_ratio import EMARatio


def adagc(
  ratio: float = 1.04,
  beta: float = 0.99,
  warmup_steps: int = 100,
  warmup_max_norm: float | None = 1.0,
  eps: float = 1e-6,
  *,
  granularity: GranularityLike = "layer",
  stacked_axes: StackedSpec = 0,
  mask: MaskLike = None,
  name: str = "adagc",
  axis_name: AxisName = None,
) -> optax.GradientTransformation:
  """Clips each layer to ``ratio`` times an EMA of its clipped norm, after a global-clip warmup.

  Every layer (each leaf by default) keeps a reference norm ``γ``. During the first
  ``warmup_steps`` updates the whole tree is clipped to the global norm ``warmup_max_norm`` and
  ``γ`` is the running minimum of the layer's clipped norm. Afterwards a layer whose norm ``n``
  exceeds ``ratio · γ`` is scaled by ``ratio · γ / (n + eps)``, and
  ``γ ← beta · γ + (1 - beta) · min(n, ratio · γ)``: a layer's threshold can rise by at most a
  factor ``beta + (1 - beta) · ratio`` per step, so a spike in one layer is clipped without
  touching the others. A layer with an exactly zero gradient does not move its ``γ`` (see
  :class:`clipchain.thresholds.EMARatio` for this and the other details). For a global AdaGC, or
  OLMo's ``max_grad_norm_ratio`` (``warmup_steps=1, warmup_max_norm=None``), use
  :class:`clipchain.thresholds.EMARatio` with :func:`clipchain.clip_norm`.

  Args:
    ratio: ``λ_rel``, the factor by which a layer's norm may exceed its ``γ``, >= 1.
    beta: the EMA decay of ``γ``, in ``[0, 1)``.
    warmup_steps: the number of updates of the warmup, >= 0.
    warmup_max_norm: ``λ_abs``, the global-norm clip of the warmup, or ``None`` for none.
    eps: added to the norm in the scale of a clipped layer, >= 0.
    granularity: ``"layer"`` (each leaf, as AdaGC's per-tensor clipping), a
      :class:`clipchain.granularity.Layer` grouping leaves otherwise (``Layer("module")``, by
      regex, by callable), ``"global"`` for a global AdaGC, ``"unit"`` for one per output unit.
    stacked_axes: with the layer or unit granularity, which leading axes of a leaf index stacked
      (scanned) layers, each then with its own ``γ``: an int (every leaf), a ``{path regex: int}``
      mapping or a callable ``(path, leaf) -> int`` (see :class:`clipchain.granularity.Layer`).
    mask: as for :func:`clipchain.clip_norm`.
    name: as for :func:`clipchain.clip_norm`.
    axis_name: as for :func:`clipchain.clip_norm`.

  Returns:
    An ``optax.GradientTransformation``; :func:`clipchain.stats` reports, per layer, the norm, the
    threshold and ``"{name}/gamma/{layer}"`` (``inf`` until the layer has had a nonzero norm).

  Examples:
    >>> import jax.numpy as jnp, optax, clipchain
    >>> tx = optax.chain(clipchain.adagc(warmup_steps=2), optax.sgd(1.0))
    >>> params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> for scale in [0.3, 0.2, 0.2, 10.0]:  # a spike in layer "a" at the last step
    ...   grads = {"a": jnp.array([scale, 0.0]), "b": jnp.array([0.0, 0.2])}
    ...   updates, state = tx.update(grads, state, params)
    >>> s = clipchain.stats(state)
    >>> round(float(s["adagc/norm/a"]), 4), round(float(s["adagc/threshold/a"]), 4)
    (10.0, 0.208)
    >>> -updates["b"]  # layer "b" is left alone
    Array([0. , 0.2], dtype=float32)

  References:
    Wang et al., `AdaGC: Improving Training Stability for Large Language Model Pretraining
    <https://arxiv.org/abs/2502.11034>`_, 2025
  """
  policy = EMARatio(
    ratio=ratio,
    beta=beta,
    warmup_steps=warmup_steps,
    warmup_max_norm=warmup_max_norm,
    eps=eps,
  )
  return clip_norm(
    policy,
    granularity=as_granularity(granularity, stacked_axes),
    mask=mask,
    name=name,
    axis_name=axis_name,
  )

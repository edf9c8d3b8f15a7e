"""AutoClip: clip to a percentile of the recent gradient norms."""

from __future__ import annotations

import optax

from clipchain._src.clip_norm import clip_norm
from clipchain._src.distributed import AxisName
from clipchain._src.granularity import GranularityLike, as_granularity
from clipchain._src.masking import MaskLike
from clipchain._src.stacking import StackedSpec
from clipchain._src.thresholds.percentile import Percentile


def autoclip(
  percentile: float = 10.0,
  *,
  window: int = 10_000,
  include_current: bool = True,
  granularity: GranularityLike = "global",
  stacked_axes: StackedSpec = 0,
  mask: MaskLike = None,
  name: str = "autoclip",
  axis_name: AxisName = None,
) -> optax.GradientTransformation:
  """Clips updates to a percentile of the norms seen so far (AutoClip).

  Each update's pre-clip norm is added to a history of the last ``window`` norms, and the update
  is clipped to the ``percentile``-th percentile of that history (linear interpolation, as
  ``np.percentile``). With the defaults this is the paper's method: the history includes the
  current norm, so the first update is never clipped, and the paper's recommended 10th percentile
  clips most updates a little and spikes a lot. The paper keeps every norm; under ``jit`` the
  history is a fixed-size ring buffer, whose 10,000 norms cost 40 KB (per layer with
  ``granularity="layer"``) and one sort per update.

  ``include_current=False`` takes the threshold from the previous norms only; with
  ``percentile=100 * quantile`` and ``window=history_length`` it is the ``autoclip`` package's
  ``QuantileClip(params, quantile, history_length, global_threshold=True)``, and with
  ``granularity="layer"`` (one layer per leaf) its per-parameter default
  (``global_threshold=False``).

  A non-finite norm (NaN or Inf anywhere in the update) never enters the history.

  Args:
    percentile: the percentile of the history to clip to, in ``[0, 100]``.
    window: how many recent norms the history holds, a positive integer.
    include_current: whether the current norm is part of the history its threshold comes from
      (the paper) or not (the ``autoclip`` package).
    granularity: ``"global"`` (the paper), ``"layer"``, or a configured
      :class:`clipchain.granularity.Layer`; per-unit or per-value histories are refused.
    stacked_axes: with the layer granularity, which leading axes of a leaf index stacked
      (scanned) layers, each then with a history of its own: an int (every leaf), a
      ``{path regex: int}`` mapping or a callable ``(path, leaf) -> int`` (see
      :class:`clipchain.granularity.Layer`).
    mask: as for :func:`clipchain.clip_norm`.
    name: as for :func:`clipchain.clip_norm`; the statistics include ``history_length``, the
      number of norms in the history.
    axis_name: as for :func:`clipchain.clip_norm`.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`clipchain.ClipNormState`.

  Raises:
    TypeError: for a percentile that is not a number, a window that is not an integer, or a
      non-bool ``include_current``.
    ValueError: for a percentile outside ``[0, 100]``, a window below 1, or a granularity whose
      groups grow with the leaves (unit, element).

  Examples:
    >>> import jax.numpy as jnp, optax, clipchain
    >>> tx = optax.chain(clipchain.autoclip(50.0), optax.sgd(1.0))
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> for g in ([0.6, 0.8], [3.0, 4.0], [6.0, 8.0]):
    ...   updates, state = tx.update({"w": jnp.array(g)}, state, params)
    >>> updates["w"]  # clipped to the median of the norms 1, 5 and 10
    Array([-3., -4.], dtype=float32)
    >>> s = clipchain.stats(state)
    >>> float(s["autoclip/threshold"]), float(s["autoclip/history_length"])
    (5.0, 3.0)

  References:
    Seetharaman, Wichern, Pardo and Le Roux, `AutoClip: Adaptive Gradient Clipping for Source
    Separation Networks <https://arxiv.org/abs/2007.14469>`_, 2020
  """
  policy = Percentile(percentile, window=window, include_current=include_current)
  return clip_norm(
    policy,
    granularity=as_granularity(granularity, stacked_axes),
    mask=mask,
    name=name,
    axis_name=axis_name,
  )

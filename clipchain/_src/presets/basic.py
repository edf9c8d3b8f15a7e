"""Named clipping transforms with optax's signatures: presets of :func:`clipchain.clip_norm`.

Each takes the same positional arguments as its optax namesake and gives the same float32 result
where optax is right; unlike optax it accumulates norms in float32, keeps the update's dtype,
creates no second gradient-sized buffer, is finite at zero norms and thresholds, validates its
arguments, and keeps statistics in its state.
"""

from __future__ import annotations

import optax

from clipchain._src import layers as layers_lib
from clipchain._src.clip_norm import ThresholdLike, as_policy, clip_norm
from clipchain._src.distributed import AxisName
from clipchain._src.granularity import Element, Layer
from clipchain._src.masking import MaskLike
from clipchain._src.stacking import StackedSpec
from clipchain._src.validation import check_bool


def clip(
  max_delta: ThresholdLike,
  *,
  clip_statistics: bool = False,
  mask: MaskLike = None,
  name: str = "clip",
  axis_name: AxisName = None,
) -> optax.GradientTransformation:
  """Clips every value of the updates to ``[-max_delta, max_delta]`` (as ``optax.clip``).

  A complex value keeps its phase: its modulus is clipped to ``max_delta``. The statistics are
  the update's norm and the threshold; ``clip_statistics=True`` adds the clipped norm and the
  fraction of values clipped, at the price of a pass over the gradient each on XLA's CPU backend
  (3.3x an Adam step with both against 1.1x without; ``benchmarks/README.md``).

  Args:
    max_delta: the largest absolute value allowed (a number, a schedule or a policy).
    clip_statistics: whether to also measure and report ``clipped_norm`` and
      ``clipped_fraction`` (static: under ``optax.inject_hyperparams``, name it in
      ``static_args``).
    mask: as for :func:`clipchain.clip_norm`.
    name: as for :func:`clipchain.clip_norm`.
    axis_name: as for :func:`clipchain.clip_norm`.

  Returns:
    An ``optax.GradientTransformation``; with ``clip_statistics``, ``clipped_fraction`` in its
    statistics is the fraction of values that were clipped.

  Examples:
    >>> import jax.numpy as jnp, clipchain
    >>> tx = clipchain.clip(1.0)
    >>> g = {"w": jnp.array([-3.0, 0.5, 2.0])}
    >>> tx.update(g, tx.init(g))[0]["w"]
    Array([-1. ,  0.5,  1. ], dtype=float32)
  """
  check_bool("clip_statistics", clip_statistics)
  return clip_norm(
    as_policy(max_delta, "max_delta"),
    granularity=Element(clip_statistics=clip_statistics),
    mask=mask,
    name=name,
    axis_name=axis_name,
  )


def clip_by_global_norm(
  max_norm: ThresholdLike,
  *,
  mask: MaskLike = None,
  name: str = "clip_by_global_norm",
  axis_name: AxisName = None,
) -> optax.GradientTransformation:
  """Clips updates so that their global L2 norm is at most ``max_norm``.

  A drop-in replacement for ``optax.clip_by_global_norm``: the update is multiplied by
  ``min(1, max_norm / ‖g‖)``, with ``‖g‖`` accumulated in float32 across and within leaves.

  Args:
    max_norm: the largest global norm (a number, a schedule or a policy).
    mask: as for :func:`clipchain.clip_norm`.
    name: as for :func:`clipchain.clip_norm`.
    axis_name: as for :func:`clipchain.clip_norm`.

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp, optax, clipchain
    >>> tx = optax.chain(clipchain.clip_by_global_norm(1.0), optax.adam(1e-3))
    >>> params = {"w": jnp.zeros(3)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.array([0.0, 3.0, 4.0])}, state, params)
    >>> float(clipchain.stats(state)["clip_by_global_norm/norm"])
    5.0

  References:
    Pascanu et al., `On the difficulty of training Recurrent Neural Networks
    <https://arxiv.org/abs/1211.5063>`_, 2013
  """
  return clip_norm(
    as_policy(max_norm, "max_norm"), granularity="global", mask=mask, name=name, axis_name=axis_name
  )


def clip_by_block_rms(
  threshold: ThresholdLike,
  *,
  stacked_axes: StackedSpec = 0,
  mask: MaskLike = None,
  name: str = "clip_by_block_rms",
  axis_name: AxisName = None,
) -> optax.GradientTransformation:
  """Clips each leaf so that its root mean square is at most ``threshold``.

  The update clipping of Adafactor, ``u ← u / max(1, rms(u) / threshold)``, as
  ``optax.clip_by_block_rms``.

  Args:
    threshold: the largest RMS of one leaf (a number, a schedule or a policy).
    stacked_axes: which leading axes of a leaf index stacked (scanned) layers, each slice then
      clipped on its own RMS: an int (every leaf), a ``{path regex: int}`` mapping or a callable
      ``(path, leaf) -> int`` (see :class:`clipchain.granularity.Layer`).
    mask: as for :func:`clipchain.clip_norm`.
    name: as for :func:`clipchain.clip_norm`.
    axis_name: as for :func:`clipchain.clip_norm`.

  Returns:
    An ``optax.GradientTransformation``; the per-layer norms in its statistics are RMS values.

  Examples:
    >>> import jax.numpy as jnp, clipchain
    >>> tx = clipchain.clip_by_block_rms(1.0)
    >>> g = {"w": jnp.array([2.0, -2.0])}
    >>> tx.update(g, tx.init(g))[0]["w"]
    Array([ 1., -1.], dtype=float32)

  References:
    Shazeer and Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory Cost
    <https://arxiv.org/abs/1804.04235>`_, 2018
  """
  return clip_norm(
    as_policy(threshold),
    granularity=Layer(norm="rms", stacked_axes=stacked_axes),
    mask=mask,
    name=name,
    axis_name=axis_name,
  )


def clip_by_layer_norm(
  max_norm: ThresholdLike,
  *,
  layers: layers_lib.LayersSpec = None,
  stacked_axes: StackedSpec = 0,
  mask: MaskLike = None,
  name: str = "clip_by_layer_norm",
  axis_name: AxisName = None,
) -> optax.GradientTransformation:
  """Clips each layer's L2 norm to ``max_norm``.

  A layer is a leaf by default. ``layers="module"`` groups the leaves of one Flax module (kernel
  and bias together), a mapping ``{name: regex}`` groups leaves by path, and a callable
  ``(path, leaf) -> name`` groups them any way. ``max_norm`` may then be a mapping from layer name
  to threshold, for a different threshold per layer.

  A model whose blocks are stacked (``nn.scan``: every block's kernel in one leaf with a leading
  layer axis) is clipped per block with ``stacked_axes``: each slice along the stacked axes is a
  layer of its own, ``params/layers/wi/kernel/3`` (with ``layers="module"``, slice ``i`` of every
  leaf of the module forms ``params/layers/mlp/3``). Boxed parameters whose Flax partition
  metadata names an axis ``"layers"`` are split along it without being told.

  Args:
    max_norm: the largest norm of a layer: a number, a ``{layer name: number}`` mapping, a
      schedule or a policy.
    layers: how leaves form layers (see above).
    stacked_axes: which leading axes of a leaf index stacked layers: an int (every leaf), a
      ``{path regex: int}`` mapping (first match; leaves that match none are not stacked) or a
      callable ``(path, leaf) -> int``.
    mask: as for :func:`clipchain.clip_norm`.
    name: as for :func:`clipchain.clip_norm`.
    axis_name: as for :func:`clipchain.clip_norm`.

  Returns:
    An ``optax.GradientTransformation``; :func:`clipchain.stats` reports ``"{name}/norm/{layer}"``
    and ``"{name}/threshold/{layer}"`` for every layer.

  Examples:
    >>> import jax.numpy as jnp, clipchain
    >>> params = {"attn": {"q": jnp.zeros(2)}, "mlp": {"w": jnp.zeros(2)}}
    >>> tx = clipchain.clip_by_layer_norm(
    ...     {"attn": 1.0, "mlp": 10.0}, layers={"attn": "attn/", "mlp": "mlp/"})
    >>> grads = {"attn": {"q": jnp.array([3.0, 4.0])}, "mlp": {"w": jnp.array([3.0, 4.0])}}
    >>> updates, state = tx.update(grads, tx.init(params))
    >>> updates["attn"]["q"], updates["mlp"]["w"]
    (Array([0.6, 0.8], dtype=float32), Array([3., 4.], dtype=float32))
  """
  return clip_norm(
    as_policy(max_norm, "max_norm"),
    granularity=Layer(layers, stacked_axes=stacked_axes),
    mask=mask,
    name=name,
    axis_name=axis_name,
  )

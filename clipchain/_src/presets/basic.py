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
from clipchain._src.granularity import Layer


def clip(
  max_delta: ThresholdLike, *, name: str = "clip", axis_name: AxisName = None
) -> optax.GradientTransformation:
  """Clips every value of the updates to ``[-max_delta, max_delta]`` (as ``optax.clip``).

  A complex value keeps its phase: its modulus is clipped to ``max_delta``.

  Args:
    max_delta: the largest absolute value allowed (a number, a schedule or a policy).
    name: the name under which :func:`clipchain.stats` reports.
    axis_name: inside ``shard_map`` or ``pmap``, the mesh axis name(s) to measure norms across
      (see :func:`clipchain.clip_norm` and ``docs/distributed.md``).

  Returns:
    An ``optax.GradientTransformation``; ``clipped_fraction`` in its statistics is the fraction
    of values that were clipped.

  Examples:
    >>> import jax.numpy as jnp, clipchain
    >>> tx = clipchain.clip(1.0)
    >>> g = {"w": jnp.array([-3.0, 0.5, 2.0])}
    >>> tx.update(g, tx.init(g))[0]["w"]
    Array([-1. ,  0.5,  1. ], dtype=float32)
  """
  return clip_norm(
    as_policy(max_delta, "max_delta"), granularity="element", name=name, axis_name=axis_name
  )


def clip_by_global_norm(
  max_norm: ThresholdLike, *, name: str = "clip_by_global_norm", axis_name: AxisName = None
) -> optax.GradientTransformation:
  """Clips updates so that their global L2 norm is at most ``max_norm``.

  A drop-in replacement for ``optax.clip_by_global_norm``: the update is multiplied by
  ``min(1, max_norm / ‖g‖)``, with ``‖g‖`` accumulated in float32 across and within leaves.

  Args:
    max_norm: the largest global norm (a number, a schedule or a policy).
    name: the name under which :func:`clipchain.stats` reports.
    axis_name: inside ``shard_map`` or ``pmap``, the mesh axis name(s) to measure norms across
      (see :func:`clipchain.clip_norm` and ``docs/distributed.md``).

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
    as_policy(max_norm, "max_norm"), granularity="global", name=name, axis_name=axis_name
  )


def clip_by_block_rms(
  threshold: ThresholdLike, *, name: str = "clip_by_block_rms", axis_name: AxisName = None
) -> optax.GradientTransformation:
  """Clips each leaf so that its root mean square is at most ``threshold``.

  The update clipping of Adafactor, ``u ← u / max(1, rms(u) / threshold)``, as
  ``optax.clip_by_block_rms``.

  Args:
    threshold: the largest RMS of one leaf (a number, a schedule or a policy).
    name: the name under which :func:`clipchain.stats` reports.
    axis_name: inside ``shard_map`` or ``pmap``, the mesh axis name(s) to measure norms across
      (see :func:`clipchain.clip_norm` and ``docs/distributed.md``).

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
    as_policy(threshold), granularity=Layer(norm="rms"), name=name, axis_name=axis_name
  )


def clip_by_layer_norm(
  max_norm: ThresholdLike,
  *,
  layers: layers_lib.LayersSpec = None,
  name: str = "clip_by_layer_norm",
  axis_name: AxisName = None,
) -> optax.GradientTransformation:
  """Clips each layer's L2 norm to ``max_norm``.

  A layer is a leaf by default. ``layers="module"`` groups the leaves of one Flax module (kernel
  and bias together), a mapping ``{name: regex}`` groups leaves by path, and a callable
  ``(path, leaf) -> name`` groups them any way. ``max_norm`` may then be a mapping from layer name
  to threshold, for a different threshold per layer.

  Args:
    max_norm: the largest norm of a layer: a number, a ``{layer name: number}`` mapping, a
      schedule or a policy.
    layers: how leaves form layers (see above).
    name: the name under which :func:`clipchain.stats` reports.
    axis_name: inside ``shard_map`` or ``pmap``, the mesh axis name(s) to measure norms across
      (see :func:`clipchain.clip_norm` and ``docs/distributed.md``).

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
    as_policy(max_norm, "max_norm"), granularity=Layer(layers), name=name, axis_name=axis_name
  )

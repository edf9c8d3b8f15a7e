"""An independent NumPy (float64) model of clipping, for the integration tests.

Written from the definitions (optax's and the papers'), not from clipchain's code: every group
whose norm ``n`` exceeds the threshold ``c`` is multiplied by ``c / n``; the element granularity
clips each value to ``[-c, c]``.
"""

from __future__ import annotations

import numpy as np


def unit_axes(shape: tuple[int, ...]) -> tuple[int, ...]:
  """The axes one unit spans with the flax layout, for the ranks the integration tests use."""
  if sum(d != 1 for d in shape) <= 1:
    return tuple(range(len(shape)))
  assert len(shape) == 2, shape
  return (0,)


def clip_leaves(leaves, kind: str, threshold, leaf_layer=None):
  """Clips a list of arrays and returns ``(clipped, statistics)``.

  Args:
    leaves: the update's leaves (any array-likes).
    kind: ``"global"``, ``"layer"`` (L2 per layer), ``"rms"`` (RMS per layer), ``"unit"`` (flax
      layout) or ``"element"``.
    threshold: a number, or with ``"layer"``/``"rms"`` a sequence with one threshold per layer.
    leaf_layer: the layer index of every leaf (``"layer"``/``"rms"``); default one layer per leaf.

  Returns:
    The clipped leaves (float64) and a dict with ``norm`` (global pre-clip L2), ``clipped_norm``
    (global post-clip L2), ``clipped_fraction`` and, for layers, ``layer_norms``.
  """
  xs = [np.asarray(x, np.float64) for x in leaves]
  norm = np.sqrt(sum(np.sum(x * x) for x in xs))
  stats = {"norm": norm}
  if kind == "global":
    factor = threshold / norm if norm > threshold else 1.0
    out = [x * factor for x in xs]
    stats["clipped_fraction"] = float(norm > threshold)
  elif kind in ("layer", "rms"):
    leaf_layer = list(range(len(xs))) if leaf_layer is None else list(leaf_layer)
    n_layers = max(leaf_layer) + 1
    limits = np.broadcast_to(np.asarray(threshold, np.float64), (n_layers,))
    squares = np.zeros(n_layers)
    sizes = np.zeros(n_layers)
    for x, layer in zip(xs, leaf_layer):
      squares[layer] += np.sum(x * x)
      sizes[layer] += x.size
    layer_norms = np.sqrt(squares / sizes) if kind == "rms" else np.sqrt(squares)
    factors = np.where(layer_norms > limits, limits / np.maximum(layer_norms, 1e-300), 1.0)
    out = [x * factors[layer] for x, layer in zip(xs, leaf_layer)]
    stats["clipped_fraction"] = float(np.mean(layer_norms > limits))
    stats["layer_norms"] = layer_norms
  elif kind == "unit":
    out, over, units = [], 0, 0
    for x in xs:
      unit_norms = np.sqrt(np.sum(x * x, axis=unit_axes(x.shape), keepdims=True))
      out.append(x * np.where(unit_norms > threshold, threshold / unit_norms, 1.0))
      over += int(np.sum(unit_norms > threshold))
      units += unit_norms.size
    stats["clipped_fraction"] = over / units
  elif kind == "element":
    out = [np.clip(x, -threshold, threshold) for x in xs]
    stats["clipped_fraction"] = float(
      np.mean(np.concatenate([np.abs(x).ravel() for x in xs]) > threshold)
    )
  else:
    raise ValueError(kind)
  stats["clipped_norm"] = np.sqrt(sum(np.sum(x * x) for x in out))
  return out, stats

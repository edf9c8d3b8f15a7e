"""Clipping an Adam-family update relative to the optimizer's own second moment (StableAdamW)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from clipchain._src import distributed, norms, stacking
from clipchain._src import state as state_lib
from clipchain._src.granularity import Granularity, Layer
from clipchain._src.guards.skipping import check_inner
from clipchain._src.rules import CLIP
from clipchain._src.state import Static
from clipchain._src.tree import TreeSignature, check_same_tree
from clipchain._src.validation import check_callable, check_choice, check_name, check_number


@state_lib.state()
class ClipBySecondMomentState(NamedTuple):
  """State of :func:`clip_by_second_moment`.

  Attributes:
    inner_state: the wrapped optimizer's state.
    rms: each group's ``sqrt(mean(g² / max(v̂, eps²)))`` at the last step (float32, one per group).
    scale: each group's factor ``1 / max(1, rms)`` at the last step.
    name: the name under which :func:`clipchain.stats` reports (static).
    layer_names: the groups, in the order of ``rms`` (static).
    signature: the paths and shapes of the tree given to ``init`` (static).
    granularity: the granularity as it applies to the tree given to ``init`` (static).
  """

  inner_state: Any
  rms: jax.Array
  scale: jax.Array
  name: Static[str] = "clip_by_second_moment"
  layer_names: Static[tuple[str, ...]] = ()
  signature: Static[TreeSignature | None] = None
  granularity: Static[Granularity | None] = None

  def report(self) -> dict[str, jax.Array]:
    count = max(len(self.layer_names), 1)
    out = {
      "rms": jnp.sum(self.rms) / count,
      "rms_max": jnp.max(self.rms, initial=0.0),
      # Scaled by more than rounding: on the first step v̂ = g², so RMS is 1 up to the last bit.
      "clipped_fraction": jnp.sum(self.scale < 1 - 1e-6).astype(jnp.float32) / count,
      "scale_min": jnp.min(self.scale, initial=1.0),
    }
    for i, layer in enumerate(self.layer_names):
      out[f"rms/{layer}"] = self.rms[i]
    return out


MomentOf = Callable[[Any], "tuple[Any, jax.Array] | None"]

# The optimizer states known to hold Adam's second moment ``nu`` (shaped like the params) and the
# step count it is bias-corrected with: optax.scale_by_adam's, which optax.adam, adamw, nadam,
# nadamw, lamb and radam keep.
SECOND_MOMENT_STATES: dict[type, MomentOf] = {
  optax.ScaleByAdamState: lambda node: (node.nu, node.count),
}


def adam_second_moment(inner_state) -> tuple[Any, jax.Array] | None:
  """``(nu, count)`` of the first ``optax.ScaleByAdamState`` in ``inner_state``, or ``None``."""
  known = tuple(SECOND_MOMENT_STATES)
  for node in jax.tree.leaves(inner_state, is_leaf=lambda n: isinstance(n, known)):
    if isinstance(node, known):
      return SECOND_MOMENT_STATES[type(node)](node)
  return None


def _one_group(path: str, leaf) -> str:
  return "all"


def clip_by_second_moment(
  inner: optax.GradientTransformation,
  *,
  b2: float,
  eps: float = 1e-6,
  second_moment: MomentOf = adam_second_moment,
  granularity: Literal["layer", "global"] | Layer = "layer",
  stacked_axes: stacking.StackedSpec = 0,
  name: str = "clip_by_second_moment",
  axis_name: distributed.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  """Scales an Adam-family update down where the gradient is large for its second moment.

  StableAdamW's update clipping (Wortsman et al. 2023): per tensor, from the gradient ``g`` given
  to this transform and the optimizer's bias-corrected second moment after this step,
  ``v̂ = nu / (1 - b2^count)``,

  ``RMS = sqrt(mean(g² / max(v̂, eps²)))``,

  and the inner optimizer's update of that tensor is multiplied by ``1 / max(1, RMS)``. When a
  gradient is far above what ``v`` has seen (a loss spike after a quiet stretch, where Adam's step
  would be much larger than ``lr``), the step is brought back to the size Adam takes at ``RMS=1``.
  The moment is read from the inner state (no second copy) by ``second_moment``: by default from
  the ``optax.ScaleByAdamState`` that ``optax.adam``, ``adamw``, ``nadam``, ``lamb``... keep, with
  ``b2`` its ``b2``; an optimizer whose state it cannot find is refused at ``init``. Place it
  as the outermost optimizer transform, inside a guard if any
  (``skip_nonfinite(clip_by_second_moment(optax.adamw(...), b2=0.999))``).

  Args:
    inner: the Adam-family optimizer whose update is clipped, e.g. ``optax.adamw(1e-3)``.
    b2: the inner optimizer's ``b2`` (for the bias correction of ``nu``), in [0, 1).
    eps: the floor of ``sqrt(v̂)``, a finite number > 0 (``max(v̂, eps²)``).
    second_moment: a function ``inner_state -> (nu, count)`` that returns the optimizer's second
      moment (a tree shaped like the params) and the step count it is bias-corrected with, or
      ``None`` when the state holds none; the default reads optax's ``ScaleByAdamState``.
    granularity: ``"layer"`` (each tensor, as the paper), ``"global"`` (one RMS over the whole
      tree), or a :class:`clipchain.granularity.Layer` with ``norm="rms"`` grouping leaves.
    stacked_axes: with ``granularity="layer"``, which leading axes of a leaf index stacked layers
      (see :class:`clipchain.granularity.Layer`): each layer of a scanned stack gets its own RMS.
    name: the name under which :func:`clipchain.stats` reports ``rms`` (mean over groups),
      ``rms_max``, ``clipped_fraction`` (groups scaled down by more than one part in a million),
      ``scale_min`` and ``rms/<layer>``.
    axis_name: inside ``shard_map`` or ``pmap``, the mesh axis name(s) over which tensors are
      split, so that each RMS is over the whole tensor.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`ClipBySecondMomentState`.

  Raises:
    ValueError: at construction for a bad ``b2``, ``eps`` or granularity; at ``init`` when
      ``second_moment`` finds no second moment in the inner state.

  Examples:
    >>> import jax.numpy as jnp, optax, clipchain
    >>> tx = clipchain.clip_by_second_moment(optax.adam(0.1), b2=0.999)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> _, state = tx.update({"w": jnp.array([1.0, 1.0])}, state, params)
    >>> float(clipchain.stats(state)["clip_by_second_moment/rms"])  # v̂ = g² on the first step
    1.0
    >>> u, state = tx.update({"w": jnp.array([100.0, 1.0])}, state, params)  # a spike
    >>> s = clipchain.stats(state)
    >>> round(float(s["clip_by_second_moment/rms"]), 2)  # sqrt((10000 / 5003 + 1) / 2)
    1.22
    >>> round(float(s["clip_by_second_moment/scale_min"]), 3)  # w's update times 1 / 1.22
    0.817

  References:
    Wortsman et al., `Stable and low-precision training for large-scale vision-language models
    <https://arxiv.org/abs/2304.13013>`_, 2023
  """
  check_number("b2", b2, low=0.0, high=1.0, high_open=True)
  check_number("eps", eps, low=0.0, low_open=True)
  check_name(name)
  check_callable("second_moment", second_moment, "inner_state -> (nu, count) or None")
  stacked_axes = stacking.validate_stacked(stacked_axes)
  if isinstance(granularity, str):
    check_choice("granularity", granularity, ("layer", "global"))
    if granularity == "global" and not stacking.is_default(stacked_axes):
      raise ValueError(
        f"stacked_axes applies to granularity='layer'; got stacked_axes={stacked_axes!r} with "
        "granularity='global'."
      )
    layers = None if granularity == "layer" else _one_group
    where = Layer(layers, norm="rms", stacked_axes=stacked_axes)
  elif isinstance(granularity, Layer) and granularity.norm == "rms":
    if not stacking.is_default(stacked_axes):
      raise ValueError(
        f"stacked_axes={stacked_axes!r} was given beside the granularity object {granularity!r}; "
        "give it to the granularity itself."
      )
    where = granularity
  else:
    raise ValueError(
      f"granularity must be 'layer', 'global' or a clipchain.granularity.Layer with norm='rms'; "
      f"got {granularity!r}."
    )
  inner = check_inner(inner)
  axis_names = distributed.as_axis_names(axis_name)

  def init_fn(params):
    inner_state = inner.init(params)
    moment = second_moment(inner_state)
    if moment is None:
      raise ValueError(
        f"{name} needs an Adam-family inner optimizer whose second moment second_moment= can "
        "read (by default the optax.ScaleByAdamState of optax.adam, adamw, nadam, ...); it found "
        f"none in the inner state {type(inner_state).__name__}."
      )
    check_same_tree(name, TreeSignature(params), moment[0], what="the inner state's nu")
    bound = where.bind(params)
    names = bound.groups(params).names
    return ClipBySecondMomentState(
      inner_state=inner_state,
      rms=jnp.zeros((len(names),), jnp.float32),
      scale=jnp.ones((len(names),), jnp.float32),
      name=name,
      layer_names=names,
      signature=TreeSignature(params),
      granularity=bound,
    )

  def update_fn(updates, state, params=None, **extra_args):
    distributed.check_bound(axis_names, name)
    if state.signature is not None:
      check_same_tree(name, state.signature, updates)
    new_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    nu, count = second_moment(inner_state)
    at = where if state.granularity is None else state.granularity
    b2_ = jnp.asarray(b2, jnp.float32)
    correction = 1 - b2_ ** jnp.asarray(count).astype(jnp.float32)
    floor = jnp.asarray(eps, jnp.float32) ** 2

    # max(v̂, eps²) = max(nu, eps² c) / c with v̂ = nu / c: the ratio is measured against nu itself
    # and the bias correction applied to the per-group result. Dividing nu by c here would be the
    # same expression as the optimizer's own v̂, which XLA then shares between the two and writes
    # out as a full-size array instead of recomputing it in each kernel.
    nu_floor = floor * correction

    def ratio(leaf_floor, g, nu):
      # optax keeps a complex parameter's nu in its dtype, with |g|² in the real part.
      nu = jnp.real(nu).astype(jnp.float32)
      # |g| for a complex gradient, whose second moment optax keeps as |g|².
      magnitude = jnp.abs(g) if jnp.iscomplexobj(g) else g
      return magnitude.astype(jnp.float32) * jax.lax.rsqrt(jnp.maximum(nu, leaf_floor))

    leaves, treedef = jax.tree.flatten(updates)
    nu_leaves = treedef.flatten_up_to(nu)
    ratios = [
      ratio(norms.unshared(nu_floor, i, g.size), g, nu)
      for i, (g, nu) in enumerate(zip(leaves, nu_leaves))
    ]
    measured = at.measure(jax.tree.unflatten(treedef, ratios), axis_names)
    # mean(g² / max(v̂, eps²)) = c · mean(g² / max(nu, eps² c)).
    root_c = jnp.sqrt(correction)
    measured = measured._replace(
      norms=measured.norms * root_c,
      squares=measured.squares * correction,
      total_squares=measured.total_squares * correction,
    )
    scaled, _ = at.clip(new_updates, measured, jnp.ones((), jnp.float32), CLIP, axis_names)
    rms = measured.norms
    new_state = ClipBySecondMomentState(
      inner_state=inner_state,
      rms=rms,
      scale=norms.clip_scale(rms, 1.0),
      name=name,
      layer_names=state.layer_names,
      signature=state.signature,
      granularity=state.granularity,
    )
    return scaled, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

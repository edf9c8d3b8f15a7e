"""Clipping an Adam-family update relative to the optimizer's own second moment (StableAdamW)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
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
    b2: the decay of the inner optimizer's second moment, which ``v̂`` is bias-corrected with
      (static): the one given, else the one read from the inner optimizer at ``init``.
    name: the name under which :func:`clipchain.stats` reports (static).
    layer_names: the groups, in the order of ``rms`` (static).
    signature: the paths and shapes of the tree given to ``init`` (static).
    granularity: the granularity as it applies to the tree given to ``init`` (static).
  """

  inner_state: Any
  rms: jax.Array
  scale: jax.Array
  b2: Static[float]
  name: Static[str] = "clip_by_second_moment"
  layer_names: Static[tuple[str, ...]] = ()
  signature: Static[TreeSignature | None] = None
  granularity: Static[Granularity | None] = None

  def report(self) -> dict[str, jax.Array]:
    # Over the groups, the last axis: under vmap the state holds one row per run.
    count = max(len(self.layer_names), 1)
    out = {
      "rms": jnp.sum(self.rms, axis=-1) / count,
      "rms_max": jnp.max(self.rms, axis=-1, initial=0.0),
      # Scaled by more than rounding: on the first step v̂ = g², so RMS is 1 up to the last bit.
      "clipped_fraction": jnp.sum(self.scale < 1 - 1e-6, axis=-1).astype(jnp.float32) / count,
      "scale_min": jnp.min(self.scale, axis=-1, initial=1.0),
    }
    for i, layer in enumerate(self.layer_names):
      out[f"rms/{layer}"] = self.rms[..., i]
    return out


MomentOf = Callable[[Any], "tuple[Any, jax.Array] | None"]

# The optimizer states that hold Adam's second moment: ``nu``, shaped like the params, the EMA of
# g² from zeros, and the step ``count`` it is bias-corrected with. optax.scale_by_adam's, which
# optax.adam, adamw, nadam, nadamw, lamb and radam keep; optax.adamax and optax.yogi keep moments
# of other kinds in a ScaleByAdamState too, which ``init`` tells apart on a probe.
SECOND_MOMENT_STATES: dict[type, MomentOf] = {
  optax.ScaleByAdamState: lambda node: (node.nu, node.count),
}

# Wrappers whose inner optimizer's moment does not see every step's gradient: it skips the steps
# it judges non-finite, or accumulates several before one step of the inner optimizer.
_SKIPPING_WRAPPERS = (optax.ApplyIfFiniteState, optax.MultiStepsState)


def _walk(node, trail: tuple = ()) -> Iterator[tuple[Any, tuple]]:
  """Every node of the pytree ``node``, parents first, each with its trail: the nodes above it,
  outermost first, each with the key of the child taken. Second-moment states are not entered."""
  yield node, trail
  if isinstance(node, tuple(SECOND_MOMENT_STATES)):
    return
  children = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)[0]
  if len(children) == 1 and not children[0][0]:  # node is a leaf
    return
  for (key,), child in children:
    yield from _walk(child, (*trail, (node, key)))


def _moment_states(tree) -> list[tuple[Any, tuple]]:
  """The second-moment states in ``tree`` (of the types of ``SECOND_MOMENT_STATES``), with their
  trails."""
  return [(n, trail) for n, trail in _walk(tree) if isinstance(n, tuple(SECOND_MOMENT_STATES))]


def _state_names(tree) -> list[str]:
  """The type names of the NamedTuple states in ``tree``, outermost first, each once."""
  names = [
    type(n).__name__ for n, _ in _walk(tree) if isinstance(n, tuple) and type(n) is not tuple
  ]
  return list(dict.fromkeys(names))


def _article(word: str) -> str:
  return "an" if word[0] in "AEIOU" else "a"


def adam_second_moment(inner_state) -> tuple[Any, jax.Array] | None:
  """``(nu, count)`` of the one state in ``inner_state`` whose type is in ``SECOND_MOMENT_STATES``
  (``optax.ScaleByAdamState``...), or ``None`` when there is none.

  Raises:
    ValueError: when there are several (one per label of ``optax.multi_transform``), when a
      transform comes before it in an ``optax.chain`` (it changes the gradient the moment sees),
      or when it is inside a wrapper that skips or accumulates steps (a guard, ``MultiSteps``).
  """
  found = _moment_states(inner_state)
  if not found:
    return None
  kind = type(found[0][0]).__name__
  if len(found) > 1:
    kinds = sorted({type(n).__name__ for n, _ in found})
    paths = ", ".join(jax.tree_util.keystr(tuple(key for _, key in trail)) for _, trail in found)
    raise ValueError(
      f"clip_by_second_moment: found {len(found)} Adam second moments ({', '.join(kinds)}) in the "
      f"inner state, at {paths}: one per label of an optax.multi_transform or optax.partition, "
      "or one per optimizer of a chain. It needs one nu covering the whole tree."
    )
  node, trail = found[0]
  for above, key in trail:
    name = type(above).__name__
    if state_lib.is_state(above) or isinstance(above, _SKIPPING_WRAPPERS):
      raise ValueError(
        f"clip_by_second_moment: the inner optimizer's {kind} is inside {_article(name)} {name}, "
        "whose inner optimizer's moment does not see every gradient given (a guard skips steps, "
        "optax.MultiSteps accumulates them, a clip changes them). Put clip_by_second_moment "
        "inside the wrapper instead: "
        "clipchain.skip_nonfinite(clipchain.clip_by_second_moment(optax.adam(1e-3)))."
      )
    if type(above) is tuple and key.idx > 0:  # optax.chain's state, in the chain's order
      before = [type(s).__name__ for s in above[: key.idx]]
      verb = "comes" if len(before) == 1 else "come"
      raise ValueError(
        f"clip_by_second_moment: in the inner optimizer's chain, {', '.join(before)} {verb} "
        f"before the {kind}: a transform there changes the gradient before the moment sees it "
        "(optax.clip_by_global_norm, clip, add_decayed_weights and identity all keep an "
        "EmptyState), and the RMS would compare the gradient given with the moment of another. "
        "Put it before clip_by_second_moment in an outer chain instead: optax.chain("
        "optax.clip_by_global_norm(1.0), clipchain.clip_by_second_moment(optax.adam(1e-3)))."
      )
  return SECOND_MOMENT_STATES[type(node)](node)


# The gradient, in every value of the probe, at each of its three steps from init.
_PROBE = (1.0, 0.0, 2.0)


def _read_b2(inner, second_moment: MomentOf, params, kind: str) -> float:
  """The decay of the inner optimizer's second moment, read from the first of three steps run on
  a probe (``params`` with every leaf a float32 zero), after checking on the three that it is
  Adam's: ``nu`` from 0, the EMA of g² with ``count`` one more at every step."""
  leaves = jax.tree.leaves(params)
  try:
    # Concrete numbers also where init is traced (jit, vmap, eval_shape): the probe is no input.
    with jax.ensure_compile_time_eval():
      probe = (
        jax.tree.map(lambda _: jnp.zeros((), jnp.float32), params) if leaves else jnp.zeros(())
      )
      state = inner.init(probe)
      moments = [_read(second_moment, state)]
      for g in _PROBE:
        grads = jax.tree.map(lambda z, g=g: z + g, probe)
        _, state = inner.update(grads, state, probe)
        moments.append(_read(second_moment, state))
      nus = [np.asarray(jax.tree.leaves(nu), np.float64) for nu, _ in moments]
      counts = [int(count) for _, count in moments]
  except Exception as error:
    raise ValueError(
      "clip_by_second_moment reads the inner optimizer's b2 at init, and checks that its second "
      "moment is Adam's, by running it for three steps on a probe (every leaf a float32 zero, "
      f"with no extra arguments, outside any trace); that failed: {type(error).__name__}: "
      f"{error}. A transform that needs extra arguments (optax.contrib.reduce_on_plateau) goes "
      "after clip_by_second_moment in an outer chain instead."
    ) from error
  if counts != list(range(len(_PROBE) + 1)):
    raise ValueError(
      f"clip_by_second_moment: the inner state's {kind} does not count one step per update: "
      f"over {len(_PROBE)} updates of a probe from init its count went {counts}. The inner "
      "optimizer skips or accumulates steps, so its moment does not see every gradient."
    )
  a = float(nus[1].flat[0]) if nus[1].size else 0.0
  read = 1.0 - a
  expected = [0.0, a, read * a, read * read * a + _PROBE[2] ** 2 * a]
  adams = 0 < a <= 1 and all(
    nu.size == nus[0].size and np.allclose(nu, want, rtol=1e-5, atol=0)
    for nu, want in zip(nus, expected)
  )
  if not adams:
    seen = ", ".join(f"{float(nu.flat[0]):.6g}" for nu in nus) if nus[0].size else "empty"
    raise ValueError(
      f"clip_by_second_moment: the inner state's {kind} does not hold Adam's second moment (nu "
      "from 0, the EMA of g², bias-corrected with the step count): given the gradients "
      f"{', '.join(map(str, _PROBE))} from init (every value of a probe), its nu went {seen}, "
      f"where Adam's with b2 = 1 - {a:.6g} goes {', '.join(f'{x:.6g}' for x in expected)}. "
      "optax.adamax (an EMA of |g|'s maximum) and optax.yogi (an additive update from 1e-6) keep "
      "such moments in a ScaleByAdamState."
    )
  # The shortest number that float32 rounds as it rounds 1 - a: 0.999 rather than 0.99899999995.
  return float(str(np.float32(read)))


def _read(second_moment: MomentOf, state) -> tuple[Any, jax.Array]:
  moment = second_moment(state)
  if moment is None:
    raise ValueError("second_moment= found no second moment in the probe's inner state.")
  return moment


def _same_in_float32(read: float, given: float) -> bool:
  """Whether ``given`` is the ``b2`` read, ``1 - a`` with ``a`` as float32 holds it, to the
  precision of float32."""
  tolerance = 2 * float(np.spacing(np.float32(1 - read)) + np.spacing(np.float32(given)))
  return abs(float(np.float32(read)) - float(np.float32(given))) <= tolerance


def _ratios(updates, nu, count, b2: float, eps: float):
  """``|g| / sqrt(max(v̂, eps²))`` per value, in float32, with ``v̂ = nu / c`` and
  ``c = 1 - b2^count``: a group's RMS of them is its StableAdamW RMS."""
  correction = 1 - jnp.asarray(b2, jnp.float32) ** jnp.asarray(count).astype(jnp.float32)
  # Written |g| sqrt(c) / sqrt(max(nu, eps² c)). Not with nu / c, which is the optimizer's own v̂:
  # XLA would share that expression between the two and write it out as a full-size array. The
  # floor is at least float32's smallest normal number: eps² c would flush to 0 for a small eps,
  # and a zero gradient then make 0 / 0.
  tiny = jnp.finfo(jnp.float32).tiny
  floor = jnp.maximum(jnp.asarray(eps, jnp.float32) ** 2 * correction, tiny)
  root_c = jnp.sqrt(correction)

  def ratio(i, g, nu):
    # optax keeps a complex parameter's nu in its dtype, with |g|² in the real part.
    nu = jnp.real(nu).astype(jnp.float32)
    magnitude = (jnp.abs(g) if jnp.iscomplexobj(g) else g).astype(jnp.float32)
    # Each leaf its own copy of the scalars (norms.unshared): shared by equally shaped leaves,
    # their broadcasts would be written out as leaf-sized arrays.
    leaf_floor, leaf_root_c = (norms.unshared(x, i, g.size) for x in (floor, root_c))
    return magnitude * (jax.lax.rsqrt(jnp.maximum(nu, leaf_floor)) * leaf_root_c)

  treedef: Any = jax.tree.structure(updates)  # a PyTreeDef (its stubs lack flatten_up_to)
  leaves = jax.tree.leaves(updates)
  nu_leaves = treedef.flatten_up_to(nu)
  return treedef.unflatten([ratio(i, g, v) for i, (g, v) in enumerate(zip(leaves, nu_leaves))])


def _one_group(path: str, leaf) -> str:
  return "all"


def clip_by_second_moment(
  inner: optax.GradientTransformation,
  *,
  b2: float | None = None,
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
  the one ``optax.ScaleByAdamState`` that ``optax.adam``, ``adamw``, ``nadam``, ``nadamw``,
  ``lamb`` and ``radam`` keep. ``init`` runs the inner optimizer for three steps
  on a probe (every leaf a float32 zero) to read ``b2`` from its moment and to check that the
  moment is Adam's (``optax.adamax`` and ``optax.yogi`` keep other moments in a
  ``ScaleByAdamState``); anything it cannot vouch for is refused there, never measured wrong.

  ``g`` must be the gradient the moment sees: place this transform as the outermost optimizer
  transform, inside a guard if any, and a gradient clip before it in an outer chain
  (``skip_nonfinite(optax.chain(clip_by_global_norm(1.0), clip_by_second_moment(optax.adamw(
  1e-3))))``), not inside the inner optimizer.

  Args:
    inner: the Adam-family optimizer whose update is clipped, e.g. ``optax.adamw(1e-3)``.
    b2: the inner optimizer's ``b2`` (for the bias correction of ``nu``), in [0, 1); ``None``
      (the default) reads it from the inner optimizer. A value given must be the one read, as
      float32 holds them.
    eps: the floor of ``sqrt(v̂)``, a finite number > 0 (``max(v̂, eps²)``; at least float32's
      smallest normal number, so that a zero gradient has RMS 0 for every ``eps``).
    second_moment: a function ``inner_state -> (nu, count)`` that returns the optimizer's second
      moment (a tree shaped like the params) and the step count it is bias-corrected with, or
      ``None`` when the state holds none; the default reads the states of
      ``SECOND_MOMENT_STATES`` and refuses the placements above.
    granularity: ``"layer"`` (each tensor, as the paper), ``"global"`` (one RMS over the whole
      tree), or a :class:`clipchain.granularity.Layer` with ``norm="rms"`` grouping leaves.
    stacked_axes: with ``granularity="layer"``, which leading axes of a leaf index stacked layers
      (see :class:`clipchain.granularity.Layer`): each layer of a scanned stack gets its own RMS.
    name: the name under which :func:`clipchain.stats` reports ``rms`` (mean over groups),
      ``rms_max``, ``clipped_fraction`` (groups scaled down by more than one part in a million),
      ``scale_min`` and ``rms/<layer>`` (one value per run under ``vmap``).
    axis_name: inside ``shard_map`` or ``pmap``, the mesh axis name(s) over which tensors are
      split, so that each RMS is over the whole tensor.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`ClipBySecondMomentState`.

  Raises:
    TypeError: at construction, for an argument of the wrong type (``inner`` a factory such as
      ``optax.adam`` itself).
    ValueError: at construction for a bad ``b2``, ``eps`` or granularity. At ``init``: when the
      inner state holds no second moment ``second_moment`` can read (the error names the states
      it holds: ``ScaleByRmsState`` of ``optax.rmsprop`` without bias correction,
      ``ScaleByBeliefState``, ``ScaleByAmsgradState``, ``ScaleByNovogradState``...); holds
      several (``optax.multi_transform`` of two Adams); holds one whose ``nu`` is not Adam's
      (``optax.adamax``, ``optax.yogi``) or does not cover the whole tree (``optax.masked``); when
      a transform comes before the moment in a chain (``optax.chain(optax.clip_by_global_norm(1),
      optax.adam(1e-3))``: an optax clip's state, ``EmptyState``, is every stateless transform's,
      so each is refused there); when the moment is inside a wrapper that skips or accumulates
      steps (a clipchain guard, ``optax.apply_if_finite``, ``optax.MultiSteps``); when the inner
      optimizer cannot run on the probe (an update that needs extra arguments); when ``b2`` is
      given and is not the inner's. At ``update``, for updates shaped unlike the tree given to
      ``init``.

  Examples:
    >>> import jax.numpy as jnp, optax, clipchain
    >>> tx = clipchain.clip_by_second_moment(optax.adam(0.1))
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> state.b2  # read from the inner optimizer
    0.999
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
  if b2 is not None:
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
      known = ", ".join(t.__name__ for t in SECOND_MOMENT_STATES)
      raise ValueError(
        f"{name} needs an Adam-family inner optimizer, and found no second moment it can read "
        f"(second_moment=; by default a {known}) in the inner state, which holds "
        f"{', '.join(_state_names(inner_state)) or 'no state'}. Adam's is the EMA of g² with "
        "the step count it is bias-corrected with (optax.adam, adamw, nadam, nadamw, lamb, "
        "radam); rmsprop's, adabelief's, amsgrad's maximum and novograd's per-leaf one are other "
        "moments."
      )
    signature, nu_signature = TreeSignature(params), TreeSignature(moment[0])
    if nu_signature != signature:
      raise ValueError(
        f"{name}: the inner optimizer's nu is not shaped like the params "
        f"({signature.difference(nu_signature, 'nu')}): it covers only some leaves (an "
        "optax.masked, or optax.multi_transform with another optimizer for some labels). It "
        "needs one nu covering the whole tree."
      )
    found = _moment_states(inner_state)
    kind = type(found[0][0]).__name__ if second_moment is adam_second_moment else "second moment"
    read = _read_b2(inner, second_moment, params, kind)
    if b2 is not None and not _same_in_float32(read, b2):
      raise ValueError(
        f"{name}: b2={b2!r} was given, but the inner optimizer's second moment decays with "
        f"b2={read:.6g} (read from its first step on a probe). Leave b2 out to use the inner's, "
        "or give both the same value."
      )
    bound = where.bind(params)
    names = bound.groups(params).names
    return ClipBySecondMomentState(
      inner_state=inner_state,
      rms=jnp.zeros((len(names),), jnp.float32),
      scale=jnp.ones((len(names),), jnp.float32),
      b2=read if b2 is None else float(b2),
      name=name,
      layer_names=names,
      signature=signature,
      granularity=bound,
    )

  def update_fn(updates, state, params=None, **extra_args):
    distributed.check_bound(axis_names, name)
    if state.signature is not None:
      check_same_tree(name, state.signature, updates)
    new_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    nu, count = second_moment(inner_state)
    at = where if state.granularity is None else state.granularity
    measured = at.measure(_ratios(updates, nu, count, state.b2, eps), axis_names)
    scaled, _ = at.clip(new_updates, measured, jnp.ones((), jnp.float32), CLIP, axis_names)
    new_state = state._replace(
      inner_state=inner_state, rms=measured.norms, scale=norms.clip_scale(measured.norms, 1.0)
    )
    return scaled, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

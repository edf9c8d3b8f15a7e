"""QK-Clip: after the optimizer's step, shrink each attention head's query and key projections so
that the head's largest pre-softmax logit comes back to a threshold.

The rescale is written as an update, so the transform composes in ``optax.chain`` after any
optimizer: for a head with factor ``s < 1`` the update ``u`` becomes ``(p + u) * s - p``, and
``optax.apply_updates`` gives ``s * (p + u)``, the step taken and then rescaled. Every other
update is passed through bit for bit. The per-head logits come from the forward pass through the
``max_logits=`` extra argument (:mod:`clipchain.attention` collects them from Flax attention).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from clipchain._src import distributed
from clipchain._src import state as state_lib
from clipchain._src import tree as tree_lib
from clipchain._src.state import Static, keep_dtypes
from clipchain._src.tree import TreeSignature, check_same_tree
from clipchain._src.validation import check_int, check_name, check_number


@state_lib.state()
class QKClipState(NamedTuple):
  """State of :func:`qk_clip`. The statistics describe the last update (0 before the first).

  Attributes:
    count: number of updates (int32).
    max_logit: the largest logit of any head, as given in ``max_logits`` (before the clip).
    clipped_fraction: the fraction of query heads whose projections were shrunk.
    module_max_logits: the largest logit of each attention module, in the order of ``modules``.
    name: the name under which :func:`clipchain.stats` reports (static).
    modules: the path of each attention module, the keys ``max_logits`` is given under (static).
    head_axis: the axis of the projections that indexes heads (static).
    signature: the paths and shapes of the tree ``init`` saw (static).
  """

  count: jax.Array  # type: ignore[assignment]  # a field, as in optax's states
  max_logit: jax.Array
  clipped_fraction: jax.Array
  module_max_logits: jax.Array
  name: Static[str] = "qk_clip"
  modules: Static[tuple[str, ...]] = ()
  head_axis: Static[int] = -2
  signature: Static[TreeSignature | None] = None

  def report(self) -> dict[str, jax.Array]:
    out = {"max_logit": self.max_logit, "clipped_fraction": self.clipped_fraction}
    for i, module in enumerate(self.modules):
      out[f"max_logit/{module or '(root)'}"] = self.module_max_logits[..., i]
    return out


class _Projection(NamedTuple):
  """A query or key leaf: its position among the tree's leaves, its module and its role."""

  position: int
  path: str
  module: str
  is_query: bool


def _compile(name: str, pattern) -> re.Pattern:
  if isinstance(pattern, re.Pattern):
    return pattern
  if not isinstance(pattern, str):
    raise TypeError(
      f"{name} must be a regular expression (str) matching the projection's leaf paths; got "
      f"{pattern!r} of type {type(pattern).__name__}."
    )
  if not pattern:
    raise ValueError(f"{name} must be a non-empty regular expression; got ''.")
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f"{name} is not a valid regular expression: {pattern!r} ({e}).") from None


def _module_of(path: str, match: re.Match) -> str:
  """The attention module a projection leaf belongs to: its path before the regex's match
  (``"decoder/attn_0"`` for ``"decoder/attn_0/query/kernel"``)."""
  return path[: match.start()].rstrip("/")


def _projections(paths, query: re.Pattern, key: re.Pattern) -> list[_Projection]:
  found = []
  for index, path in enumerate(paths):
    q, k = query.search(path), key.search(path)
    if q and k:
      raise ValueError(
        f"qk_clip: the leaf {path!r} matches both query={query.pattern!r} and "
        f"key={key.pattern!r}; make the patterns select disjoint leaves."
      )
    if q or k:
      match = q or k
      assert match is not None
      found.append(_Projection(index, path, _module_of(path, match), bool(q)))
  return found


def _plan(tree, query: re.Pattern, key: re.Pattern, head_axis: int, owner: str):
  """Modules (sorted) and their projection leaves, with the head counts checked."""
  named = tree_lib.named_leaves(tree)
  found = _projections([leaf.path for leaf in named], query, key)
  if not found:
    sample = [leaf.path for leaf in named[:6]]
    raise ValueError(
      f"{owner}: no leaf path matches query={query.pattern!r} or key={key.pattern!r}; the "
      f"tree's paths start {sample}."
    )
  modules = sorted({p.module for p in found})
  for module in modules:
    mine = [p for p in found if p.module == module]
    heads = {}
    for is_query in (True, False):
      role = "query" if is_query else "key"
      leaves = [p for p in mine if p.is_query == is_query]
      if not leaves:
        raise ValueError(
          f"{owner}: the attention module {module!r} has {role} leaves missing (it has "
          f"{[p.path for p in mine]}); query and key must select the projections of the same "
          f"modules."
        )
      counts = set()
      for p in leaves:
        shape = jnp.shape(named[p.position].leaf)
        if not -len(shape) <= head_axis < len(shape):
          raise ValueError(
            f"{owner}: head_axis={head_axis} is not an axis of {p.path!r}, of shape {shape}."
          )
        counts.add(shape[head_axis])
      if len(counts) != 1:
        raise ValueError(
          f"{owner}: the {role} leaves of {module!r} have different head counts along "
          f"head_axis={head_axis}: {sorted(counts)}."
        )
      heads[role] = counts.pop()
    if heads["query"] % heads["key"]:
      raise ValueError(
        f"{owner}: {module!r} has {heads['query']} query heads and {heads['key']} key heads; "
        "with grouped-query attention the query heads must be a multiple of the key heads."
      )
  return modules, found


def _head_factors(logits: jax.Array, threshold) -> jax.Array:
  """``min(1, threshold / S)`` per head; 1 where ``S`` is not finite (a diverged forward pass is
  not a reason to zero a head: the guards are for that step) or at most the threshold."""
  binding = jnp.isfinite(logits) & (logits > threshold)
  return jnp.where(binding, threshold / jnp.where(binding, logits, 1.0), 1.0)


def _broadcast(factor: jax.Array, leaf_shape, head_axis: int, where: str) -> jax.Array:
  """The per-head factor ``(*stacked, heads)`` shaped to multiply a leaf with its heads on
  ``head_axis`` and the stacked (scanned) layers on its leading axes."""
  ndim = len(leaf_shape)
  axis = head_axis % ndim
  lead = factor.shape[:-1]
  if len(lead) > axis or tuple(leaf_shape[: len(lead)]) != lead:
    raise ValueError(
      f"qk_clip: max_logits for {where} has shape {factor.shape}, which does not fit the leaf "
      f"of shape {tuple(leaf_shape)} (expected its leading stacked axes, then the heads on "
      f"head_axis)."
    )
  shape = lead + (1,) * (axis - len(lead)) + (factor.shape[-1],) + (1,) * (ndim - axis - 1)
  return factor.reshape(shape)


def qk_clip(
  threshold: float = 100.0,
  *,
  alpha: float = 0.5,
  query: str = r"(^|/)query/(kernel|bias)$",
  key: str = r"(^|/)key/(kernel|bias)$",
  head_axis: int = -2,
  name: str = "qk_clip",
  axis_name: distributed.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""QK-Clip (MuonClip's rescale): bounds every attention head's largest logit after the step.

  For each head ``h`` with largest pre-softmax logit ``S_h`` in this step's forward pass, the
  factor ``gamma_h = min(1, threshold / S_h)`` is applied after the optimizer's step: the head's
  query projection is multiplied by ``gamma_h ** alpha`` and its key projection by
  ``gamma_h ** (1 - alpha)``, so the head's logits are multiplied by ``gamma_h``. Place it last
  in the chain, after the optimizer (and its learning rate), so it rescales the parameters the
  step produces: for a clipped head the update ``u`` becomes ``(p + u) * s - p``, and
  ``optax.apply_updates`` gives ``s * (p + u)``; every other update is passed through unchanged.

  Grouped-query attention (fewer key heads than query heads): key head ``j`` is shared by the
  query heads ``[j G, (j + 1) G)``, ``G`` the group size; each query head takes its own
  ``gamma_h ** alpha`` and the shared key head ``(min_h gamma_h) ** (1 - alpha)`` over its group,
  so no head's logits grow and every head's are multiplied by at most its ``gamma_h``.

  A head whose ``S_h`` is not finite is left alone (``gamma_h = 1``): a non-finite forward pass is
  for a guard to skip, and zeroing the head's weights would not undo it.

  Args:
    threshold: ``tau``, the largest logit allowed (100 in Kimi K2); a positive number.
    alpha: the share of the factor given to the query projection, in [0, 1] (0.5: split evenly).
    query: a regular expression selecting the query projection's leaves by path; the attention
      module a leaf belongs to is its path before the match. The default selects the kernel and
      bias of Flax's ``nn.MultiHeadDotProductAttention`` (both, so the logits scale exactly).
    key: the same for the key projection.
    head_axis: the axis of the query and key leaves that indexes heads (``-2``: Flax's
      ``(in, heads, head_dim)`` kernels and ``(heads, head_dim)`` biases). Stacked (scanned)
      layers are the leaves' leading axes, matched by those of ``max_logits``.
    name: the name under which :func:`clipchain.stats` reports.
    axis_name: under ``shard_map`` or ``pmap``, the mesh axes the batch is split over: the
      largest logit is taken across them (``lax.pmax``). Not needed under ``jit`` with sharded
      arrays, nor for heads split over devices (each device rescales its own heads).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``max_logits={module path: array (..., heads)}``, one entry per attention module (the
    stacked layers' axes first), and the parameters; its state is a :class:`QKClipState`, and
    :func:`clipchain.stats` reports ``"{name}/max_logit"``, ``"{name}/clipped_fraction"`` and,
    per module, ``"{name}/max_logit/{module}"``.

  Raises:
    ValueError: at ``init``, when no leaf matches, a module has no key (or no query) leaves, or
      head counts disagree; at ``update``, when ``max_logits`` or ``params`` is missing or
      ``max_logits`` does not name exactly the modules found.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, clipchain
    >>> params = {"attn": {"query": {"kernel": jnp.ones((4, 2, 3))},
    ...                    "key": {"kernel": jnp.ones((4, 2, 3))}}}
    >>> tx = optax.chain(optax.sgd(0.0), clipchain.qk_clip(threshold=100.0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(
    ...     jax.tree.map(jnp.zeros_like, params), state, params,
    ...     max_logits={"attn": jnp.array([400.0, 50.0])})
    >>> new = optax.apply_updates(params, updates)
    >>> [float(new["attn"]["query"]["kernel"][0, h, 0]) for h in (0, 1)]  # sqrt(100 / 400)
    [0.5, 1.0]
    >>> s = clipchain.stats(state)
    >>> float(s["qk_clip/max_logit"]), float(s["qk_clip/clipped_fraction"])
    (400.0, 0.5)

  References:
    Kimi Team, `Kimi K2: Open Agentic Intelligence <https://arxiv.org/abs/2507.20534>`_, 2025
    (section 2.1, MuonClip)
  """
  check_number("threshold", threshold, low=0.0, low_open=True)
  check_number("alpha", alpha, low=0.0, high=1.0)
  query_re, key_re = _compile("query", query), _compile("key", key)
  # Read at init, when it is a Python int even under optax.inject_hyperparams (which passes it
  # traced to update), and kept in the state.
  check_int("head_axis", head_axis)
  check_name(name)
  axis_names = distributed.as_axis_names(axis_name)
  owner = f"qk_clip {name!r}"

  def init_fn(params):
    modules, _ = _plan(params, query_re, key_re, int(head_axis), owner)
    return QKClipState(
      count=jnp.zeros((), jnp.int32),
      max_logit=jnp.zeros((), jnp.float32),
      clipped_fraction=jnp.zeros((), jnp.float32),
      module_max_logits=jnp.zeros((len(modules),), jnp.float32),
      name=name,
      modules=tuple(modules),
      head_axis=int(head_axis),
      signature=TreeSignature(params),
    )

  def update_fn(updates, state, params=None, *, max_logits=None, **extra_args):
    del extra_args
    if state.signature is not None:
      check_same_tree(owner, state.signature, updates)
    if params is None:
      raise ValueError(f"{owner} rescales the parameters after the step: pass params to update.")
    logits_by_module = _check_logits(max_logits, state.modules, owner)
    distributed.check_bound(axis_names, owner)
    heads_at = state.head_axis
    _, found = _plan(updates, query_re, key_re, heads_at, owner)
    tau = jnp.asarray(threshold, jnp.float32)
    share = jnp.asarray(alpha, jnp.float32)

    leaves = jax.tree.leaves(updates)
    factors = {}  # module -> (query factor, key factor), each (*stacked, heads)
    module_max, clipped, heads_total = [], jnp.zeros((), jnp.float32), 0
    given = [jnp.asarray(logits_by_module[m], jnp.float32) for m in state.modules]
    # The largest logit across the devices that each saw part of the batch (a maximum: values
    # already equal on every device are unchanged), one collective for all modules.
    reduced = distributed.max_across(given, given, axis_names)
    for module, logits in zip(state.modules, reduced):
      gamma = _head_factors(logits, tau)
      key_heads = _key_heads(found, leaves, module, heads_at)
      if logits.ndim == 0 or gamma.shape[-1] % key_heads:
        raise ValueError(
          f"{owner}: max_logits[{module!r}] has shape {logits.shape}; its last axis must be the "
          f"module's query heads (a multiple of its {key_heads} key heads)."
        )
      group = gamma.reshape((*gamma.shape[:-1], key_heads, -1)).min(axis=-1)
      factors[module] = (gamma**share, group ** (1.0 - share))
      module_max.append(jnp.max(logits))
      clipped = clipped + jnp.sum(gamma < 1.0)
      heads_total += gamma.size

    param_leaves = jax.tree.leaves(params)
    if len(param_leaves) != len(leaves):
      raise ValueError(f"{owner}: params and updates have different numbers of leaves.")
    for p in found:
      factor = factors[p.module][0 if p.is_query else 1]
      u, w = leaves[p.position], param_leaves[p.position]
      s = _broadcast(factor, jnp.shape(u), heads_at, f"{p.module!r} ({p.path})")
      # Computed in float32 (the factor's dtype) and cast back, so low-precision parameters are
      # rescaled as accurately as their dtype allows.
      rescaled = (w.astype(jnp.float32) + u.astype(jnp.float32)) * s - w.astype(jnp.float32)
      leaves[p.position] = jnp.where(s < 1.0, rescaled.astype(u.dtype), u)
    new_updates = jax.tree.unflatten(jax.tree.structure(updates), leaves)

    stacked_max = jnp.stack(module_max)
    new_state = state._replace(
      count=optax.safe_increment(state.count),
      max_logit=jnp.max(stacked_max),
      clipped_fraction=clipped / heads_total,
      module_max_logits=stacked_max,
    )
    return new_updates, keep_dtypes(new_state, state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _key_heads(found, leaves, module: str, head_axis: int) -> int:
  index = next(p.position for p in found if p.module == module and not p.is_query)
  return jnp.shape(leaves[index])[head_axis]


def _check_logits(max_logits, modules: tuple[str, ...], owner: str) -> Mapping:
  if max_logits is None:
    raise ValueError(
      f"{owner} needs the largest attention logit of every head: call "
      f"update(..., max_logits={{module path: array (..., heads)}}) for the modules "
      f"{list(modules)} (clipchain.attention.max_logits collects them from a Flax forward pass)."
    )
  if not isinstance(max_logits, Mapping):
    raise TypeError(
      f"{owner}: max_logits must be a mapping from attention module paths to arrays; got "
      f"{type(max_logits).__name__}."
    )
  given = set(max_logits)
  if missing := [m for m in modules if m not in given]:
    raise ValueError(
      f"{owner}: max_logits has no entry for the attention modules {missing}; it has "
      f"{sorted(map(str, given))}."
    )
  if extra := sorted(str(m) for m in given if m not in modules):
    raise ValueError(
      f"{owner}: max_logits names modules whose query and key leaves were not found: {extra} "
      f"(the modules are {list(modules)}); check the query and key patterns."
    )
  return max_logits

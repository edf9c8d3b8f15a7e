"""The threshold-policy interface: how the clip threshold is set, independently of where norms are
measured.

A policy is written once, elementwise over the norms pytree a granularity gives it (a scalar, a
vector of layers, per-unit or per-value arrays: see :mod:`clipchain.granularity`); its state is a
``NamedTuple`` of pytrees shaped like those norms, created from ``Groups.norms`` with
``jax.tree.map``. The core (:func:`clipchain.clip_norm`) does the rest: it applies the threshold,
summarises the policy's per-group estimates through the granularity, keeps the statistics and makes
sure a non-finite norm never reaches the policy's state.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from clipchain._src.granularity import Granularity, Groups


class Context(NamedTuple):
  """What a policy may consult besides the norms.

  Attributes:
    count: the number of updates this transform has made before this one (int32).
    params: the ``params`` passed to ``update`` (``None`` when not given).
    groups: the static structure of the norms (granularity, group names, shapes).
    axis_names: the mesh axes norms are summed across (``axis_name=`` of the transform).
    norm: the L2 norm of the whole update (float32, across devices).
  """

  count: jax.Array  # type: ignore[assignment]  # a field, as in optax's states
  params: Any
  groups: Groups
  axis_names: tuple[str, ...] = ()
  norm: jax.Array | None = None

  @property
  def granularity(self) -> Granularity:
    return self.groups.granularity


class EmptyState(NamedTuple):
  """The state of a stateless policy."""


def zeros_like_norms(groups: Groups, dtype=jnp.float32, fill=0, extra_shape=()) -> Any:
  """A new pytree of arrays shaped like the norms (each ``norm.shape + extra_shape``), filled.

  Every array is a new buffer, even where ``fill`` is an array of that shape already (as
  ``optax.inject_hyperparams`` passes hyperparameters): a state must not alias one array into two
  fields, or a donated step would donate it twice.
  """
  return jax.tree.map(
    lambda s: jnp.full(s.shape + tuple(extra_shape), fill, dtype).copy(), groups.norms
  )


def map_groups(fn, outputs: int, norms, *states) -> tuple:
  """Applies ``fn(norm, *state_leaves) -> tuple of outputs`` to every leaf of the norms pytree and
  the matching leaves of per-group state pytrees, and returns ``outputs`` pytrees shaped like
  ``norms``. This is how a policy is written once for every granularity (and for empty trees)."""
  treedef: Any = jax.tree.structure(norms)  # a PyTreeDef (its stubs lack flatten_up_to)
  per_leaf = [
    fn(*args) for args in zip(jax.tree.leaves(norms), *(treedef.flatten_up_to(s) for s in states))
  ]
  return tuple(treedef.unflatten([out[i] for out in per_leaf]) for i in range(outputs))


def where_observed(norm: jax.Array, new, old):
  """``new`` where the group's norm is positive, else ``old``.

  A group whose norm is zero (a frozen, masked or unused layer, a unit that got no gradient) says
  nothing about its scale; letting it into a mean, a history or a tracker would pull that group's
  threshold towards 0, where it would clip the group's gradient to nothing when it comes back.
  """
  observed = norm > 0
  return jax.tree.map(
    lambda n, o: jnp.where(
      jnp.reshape(observed, observed.shape + (1,) * (n.ndim - observed.ndim)), n, o
    ),
    new,
    old,
  )


@dataclasses.dataclass(frozen=True)
class ThresholdPolicy(abc.ABC):
  """How a clip threshold is set. Subclass it to write a new adaptive method.

  A subclass is a frozen dataclass of its hyperparameters and implements:

  * ``__call__(norms, state, context) -> (threshold, new_state)``: elementwise over the ``norms``
    pytree (``jax.tree.map``), with no Python branching on values; the threshold is a scalar or a
    pytree shaped like ``norms``, >= 0 (a negative one is taken as 0);
  * ``init(groups) -> state`` when it keeps state: a ``NamedTuple`` of pytrees shaped from
    ``groups.norms`` (:func:`zeros_like_norms`), new arrays in every field;
  * ``statistics(state) -> dict`` for estimates worth logging: per-group pytrees shaped like the
    norms, which the granularity summarises (per layer, or the mean over units and devices) and
    :func:`clipchain.stats` reports as ``"{name}/{key}"``;
  * ``check_granularity(granularity)`` to refuse, with ``ValueError`` saying why, a granularity
    whose capabilities (``one_group_per_value``, ``groups_grow_with_size``, ``named_groups``) make
    it meaningless.
  """

  # Whether ``update`` must be given the params (shaped like the updates); the core checks it.
  needs_params: ClassVar[bool] = False

  def check_granularity(self, granularity: Granularity) -> None:  # noqa: B027
    """Raises ``ValueError`` (saying why) if this policy makes no sense at ``granularity``."""

  def init(self, groups: Groups) -> Any:
    """The initial state, fixed-shape float32/int32 arrays shaped after ``groups.norms``."""
    del groups
    return EmptyState()

  @abc.abstractmethod
  def __call__(self, norms, state, context: Context) -> tuple[Any, Any]:
    """Returns ``(threshold, new_state)``; the threshold broadcasts against ``norms``."""

  def statistics(self, state) -> dict[str, Any]:
    """Per-group estimates to report, each a pytree shaped like the norms."""
    del state
    return {}

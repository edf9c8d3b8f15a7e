"""Thresholds that do not learn from the norms: a constant (or one per layer) and a schedule."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from clipchain._src.granularity import Granularity, Groups
from clipchain._src.thresholds.base import Context, ThresholdPolicy
from clipchain._src.validation import check_non_negative


class Fixed(ThresholdPolicy):
  """A constant threshold, or one constant per layer.

  Args:
    value: a non-negative finite number (or scalar array); or, with ``granularity="layer"``, a
      mapping from layer name to threshold that names every layer.
    argname: the argument name used in error messages.

  Examples:
    >>> import jax.numpy as jnp, clipchain
    >>> tx = clipchain.clip_norm(clipchain.thresholds.Fixed(1.0))
    >>> u, _ = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init({"w": jnp.zeros(2)}))
    >>> u["w"]
    Array([0.6, 0.8], dtype=float32)
  """

  def __init__(self, value, *, argname: str = "threshold"):
    self.argname = argname
    if isinstance(value, Mapping):
      if not value:
        raise ValueError(f"{argname} must not be an empty mapping; got {{}}.")
      for layer, v in value.items():
        check_non_negative(f"{argname}[{layer!r}]", v)
      self.value = dict(value)
    else:
      check_non_negative(argname, value)
      self.value = value

  @property
  def per_layer(self) -> bool:
    return isinstance(self.value, dict)

  def check_granularity(self, granularity: Granularity) -> None:
    if self.per_layer and granularity.name != "layer":
      raise ValueError(
        f"{self.argname} given per layer (a mapping) needs the layer granularity; got "
        f"granularity={granularity.name!r}."
      )

  def init(self, groups: Groups):
    if self.per_layer:
      missing = [n for n in groups.names if n not in self.value]
      unknown = [n for n in self.value if n not in groups.names]
      if missing or unknown:
        raise ValueError(
          f"{self.argname} must give one threshold per layer: layers without one: {missing}, "
          f"names that are not layers: {unknown} (layers: {list(groups.names)})."
        )
    return super().init(groups)

  def __call__(self, norms, state, context: Context):
    if self.per_layer:
      return jnp.array([self.value[n] for n in context.groups.names], jnp.float32), state
    return jnp.asarray(self.value, jnp.float32), state

  def __repr__(self) -> str:
    return f"Fixed({self.value!r})"


class Scheduled(ThresholdPolicy):
  """A threshold that follows a schedule of the step, such as an ``optax`` schedule.

  Args:
    schedule: a function from the update count (starting at 0) to the threshold.

  Examples:
    >>> import optax, clipchain
    >>> policy = clipchain.thresholds.Scheduled(optax.linear_schedule(10.0, 1.0, 100))
    >>> tx = clipchain.clip_norm(policy)
  """

  def __init__(self, schedule: Callable[[jax.Array], jax.typing.ArrayLike]):
    if not callable(schedule):
      raise ValueError(f"schedule must be callable (step -> threshold); got {schedule!r}.")
    self.schedule = schedule

  def __call__(self, norms, state, context: Context):
    return jnp.asarray(self.schedule(context.count), jnp.float32), state

  def __repr__(self) -> str:
    return f"Scheduled({self.schedule!r})"

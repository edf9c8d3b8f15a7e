"""Thresholds that do not learn from the norms: a constant (or one per layer) and a schedule."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from clipchain._src.granularity import Granularity, Groups
from clipchain._src.thresholds.base import Context, ThresholdPolicy
from clipchain._src.validation import check_non_negative, check_schedule


@dataclasses.dataclass(frozen=True)
class Fixed(ThresholdPolicy):
  """A constant threshold, or one constant per named group (layer).

  Args:
    value: a non-negative finite number (or scalar array); or, at a granularity with named groups
      (``"layer"``), a mapping from layer name to threshold that names every layer.
    argname: the argument name used in error messages.

  Examples:
    >>> import jax.numpy as jnp, clipchain
    >>> tx = clipchain.clip_norm(clipchain.thresholds.Fixed(1.0))
    >>> u, _ = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init({"w": jnp.zeros(2)}))
    >>> u["w"]
    Array([0.6, 0.8], dtype=float32)
  """

  value: Any
  argname: str = dataclasses.field(default="threshold", repr=False, compare=False)

  def __post_init__(self):
    if isinstance(self.value, Mapping):
      if not self.value:
        raise ValueError(f"{self.argname} must not be an empty mapping; got {{}}.")
      for layer, v in self.value.items():
        if not isinstance(layer, str):
          raise TypeError(f"{self.argname} must map layer names (str) to numbers; got {layer!r}.")
        check_non_negative(f"{self.argname}[{layer!r}]", v)
      object.__setattr__(self, "value", dict(self.value))
    else:
      check_non_negative(self.argname, self.value)

  @property
  def per_layer(self) -> bool:
    return isinstance(self.value, dict)

  def check_granularity(self, granularity: Granularity) -> None:
    if self.per_layer and not granularity.named_groups:
      raise ValueError(
        f"{self.argname} given per layer (a mapping) needs a granularity with named groups "
        f"('layer'); got {granularity!r}."
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


@dataclasses.dataclass(frozen=True)
class Scheduled(ThresholdPolicy):
  """A threshold that follows a schedule of the step, such as an ``optax`` schedule.

  The schedule must return a scalar; a value below 0 is taken as 0 (everything is clipped to 0).

  Args:
    schedule: a function from the update count (starting at 0) to the threshold.

  Examples:
    >>> import optax, clipchain
    >>> policy = clipchain.thresholds.Scheduled(optax.linear_schedule(10.0, 1.0, 100))
    >>> tx = clipchain.clip_norm(policy)
  """

  schedule: Callable[[jax.Array], jax.typing.ArrayLike]
  argname: str = dataclasses.field(default="schedule", repr=False, compare=False)

  def __post_init__(self):
    check_schedule(self.argname, self.schedule)

  def __call__(self, norms, state, context: Context):
    value = self.schedule(context.count)
    if jnp.ndim(value) != 0:
      raise ValueError(
        f"schedule must return a scalar threshold; it returned shape {jnp.shape(value)}."
      )
    return jnp.asarray(value, jnp.float32), state

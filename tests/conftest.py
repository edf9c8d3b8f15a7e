"""Shared fixtures: every numerical test runs both eagerly and under ``jax.jit``."""

import jax
import pytest


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def maybe_jit(request):
  """``jax.jit`` or the identity, so a test body runs once each way."""
  return jax.jit if request.param else (lambda fn: fn)

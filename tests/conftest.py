"""Shared fixtures: every numerical test runs both eagerly and under ``jax.jit``.

Eight CPU devices for the sharding tests (tests/test_distributed.py). pytest imports this file
before it collects any test module or doctest, so the setting is in place before anything creates
an array and JAX starts its backend; single-device code still runs on the first device.
"""

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def maybe_jit(request):
  """``jax.jit`` or the identity, so a test body runs once each way."""
  return jax.jit if request.param else (lambda fn: fn)

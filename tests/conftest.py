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


# Modules whose tests take tens of seconds each (whole studies, subprocesses, the benchmark's
# compiles). Collected first, they start on both workers at once and the many short tests fill
# the end of the run, instead of one worker finishing a long test alone while the other idles.
SLOW_MODULES = (
  "test_benchmark_smoke.py",
  "test_study_cli.py",
  "test_multiprocess.py",
  "test_study_example.py",
  "test_study.py",
  "test_distributed.py",
)


def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: item.path.name not in SLOW_MODULES)  # stable: order kept within

"""Shared fixtures: every numerical test runs both eagerly and under ``jax.jit``.

Eight CPU devices for the sharding tests (tests/test_distributed.py). pytest imports this file
before it collects any test module or doctest, so the setting is in place before anything creates
an array and JAX starts its backend; single-device code still runs on the first device.
"""

import os
import tempfile

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)
# Most of the suite's time is XLA compiling small programs that then run in microseconds: without
# LLVM's optimisation passes the CPU backend compiles them markedly faster. The HLO (fusions,
# buffers: what the benchmark budget checks) and the arithmetic are the same; only the machine
# code is less tuned. The interpreters the tests start get both (harness.child_jax_settings).
# Many tests compile the same programs (the same transform on the same tree, eager operations):
# a compilation cache shared by the run's workers compiles each once. A fresh directory per run
# (made by the first process, inherited by the workers it starts), so no run reads another's.
_CACHE = os.environ.setdefault(
  "CLIPCHAIN_TEST_JAX_CACHE", tempfile.mkdtemp(prefix="clipchain-test-jax-cache-")
)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
os.environ["XLA_FLAGS"] = " ".join(
  [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]
).strip()


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

"""The wheel and the sdist build, pass ``twine check``, and the wheel works from any directory."""

from __future__ import annotations

import email
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
  out = tmp_path_factory.mktemp("dist")
  # No isolation: the build backend (setuptools) is in the test environment; nothing downloaded.
  subprocess.run(
    [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(_ROOT)],
    check=True,
    capture_output=True,
    text=True,
  )
  return out


def test_wheel_and_sdist_pass_twine_check(dist):
  files = sorted(p.name for p in dist.iterdir())
  assert any(f.endswith(".whl") for f in files) and any(f.endswith(".tar.gz") for f in files)
  result = subprocess.run(
    [sys.executable, "-m", "twine", "check", "--strict", *map(str, dist.iterdir())],
    capture_output=True,
    text=True,
  )
  assert result.returncode == 0, result.stdout + result.stderr


def test_wheel_holds_the_package_and_declares_only_runtime_dependencies(dist):
  (wheel,) = dist.glob("*.whl")
  from clipchain import __version__

  assert f"clipchain-{__version__}-" in wheel.name
  with zipfile.ZipFile(wheel) as archive:
    names = archive.namelist()
    metadata = email.message_from_string(
      archive.read(next(n for n in names if n.endswith("METADATA"))).decode()
    )
    entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
  assert "clipchain/py.typed" in names and "clipchain/study/cli.py" in names
  assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "examples/"))]
  runtime = sorted(
    r.split(">")[0].split("=")[0].strip()
    for r in metadata.get_all("Requires-Dist")
    if "extra ==" not in r
  )
  assert runtime == ["jax", "jaxlib", "numpy", "optax"]
  assert {"docs", "study", "test"} <= set(metadata.get_all("Provides-Extra"))
  assert "clipchain = clipchain.study.cli:main" in entry_points


def test_installed_wheel_works_from_any_directory(dist, tmp_path):
  (wheel,) = dist.glob("*.whl")
  site = tmp_path / "site"
  subprocess.run(
    [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
    check=True,
    capture_output=True,
  )
  elsewhere = tmp_path / "elsewhere"
  (elsewhere / "clipchain").mkdir(parents=True)  # a same-named folder must not shadow the package
  env = {**os.environ, "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu"}
  code = (
    "import clipchain, jax.numpy as jnp\n"
    "tx = clipchain.clip_by_global_norm(1.0)\n"
    "g = {'w': jnp.array([3.0, 4.0])}\n"
    "print(clipchain.__file__)\n"
    "print(tx.update(g, tx.init(g))[0]['w'].tolist())\n"
  )
  result = subprocess.run(
    [sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True
  )
  assert result.returncode == 0, result.stderr
  path, values = result.stdout.splitlines()
  assert path.startswith(str(site))
  assert values == "[0.6000000238418579, 0.800000011920929]"
  cli = subprocess.run(
    [sys.executable, "-m", "clipchain", "study", "--help"],
    cwd=elsewhere,
    env=env,
    capture_output=True,
    text=True,
  )
  assert cli.returncode == 0 and "--strategies" in cli.stdout, cli.stderr

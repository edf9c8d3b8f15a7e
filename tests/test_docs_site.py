"""The documentation site: it builds with warnings as errors and documents every public symbol."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import zlib

import pytest
import yaml

import clipchain

ROOT = pathlib.Path(__file__).resolve().parent.parent
PUBLIC_MODULES = ("attention", "granularity", "rules", "study", "thresholds")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("site")
  env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
  result = subprocess.run(
    [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr
  assert "WARNING" not in result.stderr, result.stderr
  return out


def _inventory(site: pathlib.Path) -> set[str]:
  """The Python objects the site documents, from its Sphinx-format ``objects.inv``."""
  header_and_body = (site / "objects.inv").read_bytes().split(b"\n", 4)
  body = zlib.decompress(header_and_body[4]).decode()
  return {line.split()[0] for line in body.splitlines() if " py:" in line}


def _public_names() -> list[str]:
  names = [f"clipchain.{n}" for n in clipchain.__all__ if not n.startswith("__")]
  for module in PUBLIC_MODULES:
    exported = __import__(f"clipchain.{module}", fromlist=["__all__"]).__all__
    names += [f"clipchain.{module}.{n}" for n in exported]
  return names


def test_every_public_symbol_has_an_entry_in_the_api_reference(site):
  documented = _inventory(site)
  missing = [name for name in _public_names() if name not in documented]
  assert missing == []


def test_every_page_is_in_the_navigation_and_built(site):
  config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

  def pages(nav):
    for entry in nav:
      value = next(iter(entry.values())) if isinstance(entry, dict) else entry
      yield from pages(value) if isinstance(value, list) else [value]

  listed = set(pages(config["nav"]))
  docs = ROOT / "docs"
  on_disk = {str(p.relative_to(docs)) for p in docs.rglob("*.md")}
  assert listed == on_disk
  for page in listed:
    assert (site / page.replace(".md", ".html")).is_file(), page


def test_docstring_markup_renders_as_names_links_and_code(site):
  # The docstrings' Sphinx roles (:func:`x`) would otherwise show as literal text.
  for page in (site / "api").glob("*.html"):
    html = page.read_text()
    assert ":func:" not in html and ":class:" not in html and ":mod:" not in html, page.name
    # RST links in References become links; nothing renders as an accidental quotation.
    assert "&lt;http" not in html and "<blockquote>" not in html, page.name
  # What a role becomes: the name alone (clip_norm's docstring refers to :func:`clipchain.stats`).
  assert "<code>clipchain.stats</code>" in (site / "api" / "transforms.html").read_text()


def test_the_quick_start_shows_the_example_the_tests_run(site):
  html = (site / "quickstart.html").read_text()
  first_line = (ROOT / "examples" / "quickstart.py").read_text().splitlines()[0]
  assert first_line.strip('"# ')[:30] in html

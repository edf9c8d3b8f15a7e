"""The worked examples in the docs run as written."""

from __future__ import annotations

import pathlib
import re
import sys
import types

import pytest

DOCS = pathlib.Path(__file__).parent.parent / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks(page: str) -> list[str]:
  return BLOCK.findall((DOCS / page).read_text())


def run_block(page: str, index: int) -> None:
  """Runs the page's ``index``-th Python block as a module of its own (dataclasses look their
  module up in ``sys.modules``)."""
  module = types.ModuleType(f"docs_{page.removesuffix('.md').replace('-', '_')}_{index}")
  sys.modules[module.__name__] = module
  try:
    exec(compile(blocks(page)[index], f"docs/{page}[{index}]", "exec"), module.__dict__)
  finally:
    del sys.modules[module.__name__]


@pytest.mark.parametrize("index", range(len(blocks("extending.md"))))
def test_extending_examples_run(index, capsys):
  run_block("extending.md", index)
  assert capsys.readouterr().out  # each example shows its result


@pytest.mark.parametrize("index", range(len(blocks("logging.md"))))
def test_logging_examples_run(index, capsys):
  run_block("logging.md", index)
  printed = capsys.readouterr().out
  assert "zclip/clipped_fraction" in printed and printed.strip().endswith("3")


def test_mixed_precision_example_prints_what_the_page_shows(capsys):
  run_block("mixed-precision.md", 0)
  # The output the page shows under its example.
  shown = re.search(r"^```text\n(.*?)^```", (DOCS / "mixed-precision.md").read_text(), re.S | re.M)
  assert capsys.readouterr().out == shown[1]

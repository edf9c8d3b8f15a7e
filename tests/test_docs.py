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


@pytest.mark.parametrize("index", range(len(blocks("extending.md"))))
def test_extending_examples_run(index, capsys):
  # Run as a module of its own: dataclasses look their module up in sys.modules.
  module = types.ModuleType(f"docs_extending_{index}")
  sys.modules[module.__name__] = module
  try:
    code = compile(blocks("extending.md")[index], f"docs/extending.md[{index}]", "exec")
    exec(code, module.__dict__)
  finally:
    del sys.modules[module.__name__]
  assert capsys.readouterr().out  # each example shows its result


@pytest.mark.parametrize("index", range(len(blocks("logging.md"))))
def test_logging_examples_run(index, capsys):
  module = types.ModuleType(f"docs_logging_{index}")
  sys.modules[module.__name__] = module
  try:
    exec(compile(blocks("logging.md")[index], f"docs/logging.md[{index}]", "exec"), module.__dict__)
  finally:
    del sys.modules[module.__name__]
  printed = capsys.readouterr().out
  assert "zclip/clipped_fraction" in printed and printed.strip().endswith("3")


def test_mixed_precision_example_prints_what_the_page_shows(capsys):
  code, shown = BLOCK.findall((DOCS / "mixed-precision.md").read_text())[0], _text_block()
  module = types.ModuleType("docs_mixed_precision")
  sys.modules[module.__name__] = module
  try:
    exec(compile(code, "docs/mixed-precision.md[0]", "exec"), module.__dict__)
  finally:
    del sys.modules[module.__name__]
  assert capsys.readouterr().out == shown


def _text_block() -> str:
  """The output the mixed-precision page shows under its example."""
  page = (DOCS / "mixed-precision.md").read_text()
  return re.search(r"^```text\n(.*?)^```", page, re.S | re.M)[1]

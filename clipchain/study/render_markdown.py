"""Renders a :class:`~clipchain.study.document.Document` as Markdown (``report.md``)."""

from __future__ import annotations

import pathlib
import re

from clipchain.study.document import Document

_SPECIAL = re.compile(r"([\\`*_\[\]<>|#])")


def _escape(text: str) -> str:
  return _SPECIAL.sub(r"\\\1", str(text))


def render(doc: Document, out_dir: pathlib.Path) -> str:
  """The Markdown of ``doc``; images are linked relative to ``out_dir``."""
  out = []
  for block in doc.blocks:
    kind = block[0]
    if kind == "heading":
      out.append(f"{'#' * block[1]} {_escape(block[2])}")
    elif kind == "para":
      out.append(_escape(block[1]))
    elif kind == "bullets":
      out.append("\n".join(f"- {_escape(item)}" for item in block[1]))
    elif kind == "table":
      header, rows = block[1], block[2]
      lines = ["| " + " | ".join(_escape(h) for h in header) + " |", "|" + "---|" * len(header)]
      lines += ["| " + " | ".join(_escape(c) for c in row) + " |" for row in rows]
      out.append("\n".join(lines))
    elif kind == "image":
      out.append(f"![{_escape(block[2])}]({block[1].relative_to(out_dir).as_posix()})")
  return "\n\n".join(out) + "\n"

"""The report as a list of blocks (headings, paragraphs, tables, images), computed once and rendered
by each format's renderer, so that ``report.md`` and ``report.html`` cannot disagree."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence


@dataclasses.dataclass
class Document:
  """The blocks of a report, in order; each a tuple whose first entry names its kind."""

  blocks: list[tuple] = dataclasses.field(default_factory=list)

  def heading(self, level: int, text: str) -> None:
    self.blocks.append(("heading", level, text))

  def para(self, text: str) -> None:
    self.blocks.append(("para", text))

  def bullets(self, items: Sequence[str]) -> None:
    self.blocks.append(("bullets", tuple(items)))

  def table(self, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    self.blocks.append(("table", tuple(header), tuple(tuple(r) for r in rows)))

  def image(self, path: pathlib.Path, alt: str) -> None:
    self.blocks.append(("image", path, alt))

"""Renders a :class:`~clipchain.study.document.Document` as one self-contained HTML file
(``report.html``): the plots are embedded as data URIs, so it can be mailed or attached."""

from __future__ import annotations

import base64
import html

from clipchain.study.document import Document

_CSS = """
body { font-family: sans-serif; max-width: 72rem; margin: 1rem auto; padding: 0 1rem;
       line-height: 1.45; color: #222; }
h1, h2, h3, h4 { line-height: 1.2; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .2rem; margin-top: 2.5rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .9rem; }
th, td { border: 1px solid #ccc; padding: .2rem .5rem; text-align: left; }
th { background: #f3f3f3; }
tbody tr:nth-child(even) { background: #fafafa; }
img { max-width: 100%; height: auto; display: block; margin: .5rem 0 1rem; }
"""


def render(doc: Document, title: str) -> str:
  """The HTML of ``doc``, titled ``title``."""
  esc = html.escape
  out = [
    "<!DOCTYPE html>",
    '<html lang="en">',
    "<head>",
    '<meta charset="utf-8">',
    '<meta name="viewport" content="width=device-width, initial-scale=1">',
    f"<title>{esc(title)}</title>",
    f"<style>{_CSS}</style>",
    "</head>",
    "<body>",
  ]
  for block in doc.blocks:
    kind = block[0]
    if kind == "heading":
      out.append(f"<h{block[1]}>{esc(block[2])}</h{block[1]}>")
    elif kind == "para":
      out.append(f"<p>{esc(block[1])}</p>")
    elif kind == "bullets":
      out.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in block[1]) + "</ul>")
    elif kind == "table":
      head = "".join(f"<th>{esc(h)}</th>" for h in block[1])
      body = "".join(
        "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in block[2]
      )
      out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    elif kind == "image":
      data = base64.b64encode(block[1].read_bytes()).decode("ascii")
      out.append(f'<img src="data:image/png;base64,{data}" alt="{esc(block[2])}">')
  out += ["</body>", "</html>"]
  return "\n".join(out) + "\n"

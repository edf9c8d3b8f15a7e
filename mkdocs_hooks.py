"""MkDocs hooks for the documentation site (``hooks:`` in mkdocs.yml).

The docstrings follow optax's conventions, Google style with Sphinx cross-reference roles
(``:func:`clipchain.stats```), which mkdocstrings renders as literal text before the code. This
hook drops the role markers (and Sphinx's ``~`` short-name prefix) from the rendered pages, so the
reader sees the name alone.
"""

from __future__ import annotations

import re

# A role rendered by Markdown: `:func:` followed by the code span of its target.
_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj|exc):(<code>)~?")


def on_page_content(html: str, **kwargs) -> str:
  return _ROLE.sub(r"\1", html)

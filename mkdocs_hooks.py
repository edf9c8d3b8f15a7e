"""MkDocs hooks for the documentation site (``hooks:`` in mkdocs.yml).

The docstrings follow optax's conventions: Google style, with Sphinx cross-reference roles
(``:func:`clipchain.stats```) and reStructuredText links in their References
(```Title <https://...>`_``). mkdocstrings renders both as literal text around a code span. This
hook turns them back into what they mean on the rendered pages: a role into the name alone (without
Sphinx's ``~`` short-name prefix), an RST link into a link.
"""

from __future__ import annotations

import re

# A role rendered by Markdown: `:func:` followed by the code span of its target.
_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj|exc):(<code>)~?")
# An RST hyperlink rendered by Markdown: a code span "Title <url>" followed by an underscore.
_RST_LINK = re.compile(r"<code>([^<]*?)\s*&lt;(https?://[^&<]+)&gt;</code>_")


def on_page_content(html: str, **kwargs) -> str:
  html = _ROLE.sub(r"\1", html)
  return _RST_LINK.sub(r'<a href="\2">\1</a>', html)

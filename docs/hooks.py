"""MkDocs hooks of the docs build."""

from __future__ import annotations

import re
from typing import Any

# docs/benchmarks.md is written by ``python -m bench --write-docs``: its table cells quote Python
# idioms such as ``d[k]['score'] += 1`` as plain text, which Markdown would read as a reference
# link (``[k]['score']``). Escaping the second bracket keeps the text as written.
_REF_LIKE = re.compile(r"\](?=\[')")


def on_page_markdown(markdown: str, *, page: Any, **kwargs: Any) -> str:
    """Keep bracketed Python idioms in the generated benchmark tables literal."""
    if page.file.src_uri != "benchmarks.md":
        return markdown
    return _REF_LIKE.sub("]\\\\", markdown)

"""mkdocs hooks (mkdocs.yml): the docs' fenced blocks as Python-Markdown reads them.

A runnable block's info string is `bash run` (tests/test_docs.py runs it); GitHub highlights by the first word,
but Python-Markdown's fenced_code takes an info string of one word only and would print the block as a paragraph,
so the marker is dropped before the page is rendered.
"""

import re

MARKER = re.compile(r"^( {0,3}(?:`{3,}|~{3,})[\w#.+-]+)[ \t]+run[ \t]*$", flags=re.M)


def on_page_markdown(markdown: str, **kwargs) -> str:
    return MARKER.sub(r"\1", markdown)

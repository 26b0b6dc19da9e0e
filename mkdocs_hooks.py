"""mkdocs hooks (mkdocs.yml): the docs' fenced blocks as Python-Markdown reads them.

tests/project/test_docs.py reads markers after a block's language (```bash run: run it; ```yaml config: validate it);
GitHub highlights by the first word, but Python-Markdown's fenced_code takes an info string of one word only and
would print the block as a paragraph, so the markers are dropped before the page is rendered.
"""

import re

MARKERS = re.compile(r"^( {0,3}(?:`{3,}|~{3,})[\w#.+-]+)(?:[ \t]+(?:run|config))+[ \t]*$", flags=re.M)


def on_page_markdown(markdown: str, **kwargs) -> str:
    return MARKERS.sub(r"\1", markdown)

"""The public Python API: `tunelab.__all__`, and docs/api.md, the page that lists it.

tests/project/test_docs.py checks that the page's Python blocks call these names as they are (they exist, their
calls bind to the signatures); here: each public name is the object of the module that defines it, the page lists
exactly `tunelab.__all__` and shows each in an example, and `import tunelab` stays cheap (no torch).
"""

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tunelab

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "api.md"


@pytest.mark.parametrize("name", tunelab.__all__)
def test_each_public_name_is_its_modules_own(name):
    obj = getattr(tunelab, name)
    module = importlib.import_module(tunelab._API[name])
    assert getattr(module, name) is obj
    assert getattr(obj, "__module__", module.__name__).startswith("tunelab."), f"{name} comes from outside tunelab"


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'apply_loras'"):
        tunelab.apply_loras  # noqa: B018


def test_the_api_page_lists_exactly_the_public_names():
    text = PAGE.read_text(encoding="utf-8")
    table = text.split("\n## ", 1)[0]  # the table of names before the first section
    listed = set(re.findall(r"`([A-Za-z_]\w*)`", " ".join(l.split("|")[2] for l in table.splitlines()
                                                            if l.startswith("| ") and l.count("|") >= 4)))
    assert listed == set(tunelab.__all__), (listed ^ set(tunelab.__all__))
    # every name imported from `tunelab` in an example is public, and every public name has an example
    imported = set()
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and node.module == "tunelab":
                imported |= {a.name for a in node.names}
    assert imported == set(tunelab.__all__), (imported ^ set(tunelab.__all__))


def test_import_tunelab_does_not_import_torch():
    code = "import sys, tunelab; print('torch' in sys.modules, tunelab.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["False", tunelab.__version__]

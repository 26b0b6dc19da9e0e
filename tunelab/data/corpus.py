"""A local corpus that lies on every machine with Python: pretraining and SFT with no downloads.

Three kinds, all read from the running Python's standard library (so the exact text depends on the
Python version; for one version it is deterministic for a seed):
  code  - the standard library's `.py` files, one document per file
  prose - the `pydoc_data` help topics and the standard modules' docstrings
  qa    - question/answer pairs from docstrings: "What does `json.dumps` do?" -> the docstring's summary
Source files are parsed with `ast`, never imported, so building has no side effects.
"""

from __future__ import annotations

import ast
import functools
import inspect
import os
import random
import re
import sysconfig
import tokenize
from pathlib import Path

from tunelab.errors import TunelabError

KINDS = ("code", "prose", "qa")
# Test suites and vendored packages are not the library's own text (and some test files are
# deliberately broken or mis-encoded).
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}
_MIN_DOC_CHARS = 80   # module docstrings shorter than this are one-liners, not prose
_MIN_ANSWER_CHARS = 30


def stdlib_files() -> list[Path]:
    """The standard library's own `.py` files, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("test"))
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py") and not f.startswith("test_")]
    return sorted(files)


def _module_name(path: Path) -> str:
    rel = path.relative_to(sysconfig.get_paths()["stdlib"]).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def _parse(path: Path) -> tuple[str, ast.Module] | None:
    try:
        source = path.read_text(encoding="utf-8")
        return source, ast.parse(source)
    except (UnicodeDecodeError, SyntaxError, ValueError):
        return None


def _summary(doc: str) -> str:
    """The first paragraph of a docstring, whitespace collapsed."""
    first = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    return " ".join(first.split())


def _code(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return []
    return [{"text": text, "path": _module_name(path) + ".py"}] if text.strip() else []


def _module_docstring(path: Path) -> str | None:
    """The module docstring, read from the first tokens only (parsing whole files costs ~10 s)."""
    try:
        with open(path, encoding="utf-8") as f:
            for tok in tokenize.generate_tokens(f.readline):
                if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.ENCODING):
                    continue
                if tok.type != tokenize.STRING:
                    return None
                doc = ast.literal_eval(tok.string)
                return inspect.cleandoc(doc) if isinstance(doc, str) else None
    except (UnicodeDecodeError, SyntaxError, ValueError, tokenize.TokenError):
        return None
    return None


def _prose(path: Path) -> list[dict]:
    doc = _module_docstring(path)
    if not doc or len(doc) < _MIN_DOC_CHARS:
        return []
    return [{"text": doc.strip(), "path": _module_name(path)}]


def _qa(path: Path) -> list[dict]:
    parsed = _parse(path)
    if not parsed:
        return []
    module = _module_name(path)
    pairs = []
    for node in parsed[1].body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        answer = _summary(doc) if doc else ""
        if len(answer) < _MIN_ANSWER_CHARS:
            continue
        verb = "What is" if isinstance(node, ast.ClassDef) else "What does"
        tail = "" if isinstance(node, ast.ClassDef) else " do"
        prompt = f"{verb} `{module}.{node.name}`{tail} in Python?"
        pairs.append({"prompt": prompt, "response": answer, "text": f"{prompt}\n{answer}", "path": module})
    return pairs


def _pydoc_topics() -> list[dict]:
    import pydoc_data.topics

    return [{"text": text.strip(), "path": f"pydoc_data.topics:{name}"}
            for name, text in sorted(pydoc_data.topics.topics.items()) if len(text) >= _MIN_DOC_CHARS]


def local_corpus(kind: str, seed: int = 0, max_docs: int | None = None) -> list[dict]:
    """Records of one local kind (`code`, `prose`, `qa`) in a seeded random order; every record has
    "text" and "path" (qa records also "prompt" and "response"). `max_docs` stops early, which is fast:
    files are visited in the seeded order and parsed only until enough records are found. (The full qa
    corpus parses every file, ~10 s once per process; results are cached.)"""
    if kind not in KINDS:
        raise TunelabError(f"unknown local corpus kind {kind!r}: use one of {', '.join(KINDS)} (e.g. local:code)")
    return [dict(r) for r in _local_corpus(kind, seed, max_docs)]


@functools.lru_cache(maxsize=8)
def _local_corpus(kind: str, seed: int, max_docs: int | None) -> tuple[dict, ...]:
    files = stdlib_files()
    random.Random(seed).shuffle(files)
    extract = {"code": _code, "prose": _prose, "qa": _qa}[kind]
    records = _pydoc_topics() if kind == "prose" else []
    for f in files:
        if max_docs is not None and len(records) >= max_docs:
            break
        records += extract(f)
    records = records[:max_docs]
    random.Random(seed + 2).shuffle(records)  # qa pairs come grouped by module; spread them
    return tuple(records)

"""A prompt-injection scan of SFT (or any text) data: find text that carries instructions aimed at the model.

Each line of the file is scanned; in a JSONL file every string value of the record is decoded first, so
escapes (\\u0069gnore, \\n) cannot hide a phrase, and the report names the field. Patterns cover the known
families: overriding earlier instructions, role-play/persona overrides, fake role headers ("system:",
chat-template tokens), requests to reveal the system prompt, and instructions hidden in HTML/code comments.
A find is a lead for a person to read, not a verdict: documentation *about* injection also matches.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import DataError

_I = re.IGNORECASE
# (name, pattern). Phrases, not single words, to keep ordinary text from matching.
PATTERNS: list[tuple[str, re.Pattern]] = [
    ("override", re.compile(
        r"\b(ignore|disregard|forget|skip|override|bypass)\s+(all\s+|any\s+|the\s+|your\s+|of\s+)*"
        r"(previous|prior|above|earlier|preceding|former|original|system|safety)\s+"
        r"(instructions?|prompts?|rules|directions|guidelines|context|messages?|constraints)", _I)),
    ("override", re.compile(r"\b(do\s+not|don't)\s+follow\s+(the\s+|your\s+|any\s+)*(rules|instructions|guidelines|policy|policies)", _I)),
    ("new_instructions", re.compile(r"\b(new|updated|real|actual)\s+instructions\s*:", _I)),
    ("role_play", re.compile(
        r"\b(you\s+are\s+now\s+(an?\s+|my\s+|in\s+)?(DAN|unrestricted|unfiltered|uncensored|evil|jailbroken|developer\s+mode)"
        r"|from\s+now\s+on,?\s+you\s+(are|will|must)|pretend\s+(to\s+be|you\s+are|that\s+you\s+are)\s+(an?\s+)?(ai|assistant|model|unrestricted|human)"
        r"|act\s+as\s+(if\s+you\s+have\s+no|an?\s+unrestricted|dan\b)|you\s+are\s+no\s+longer\s+(an?\s+)?(ai|assistant|bound))", _I)),
    ("jailbreak", re.compile(r"\b(developer\s+mode|jailbreak(ed)?|do\s+anything\s+now|DAN\s+mode)\b", _I)),
    ("reveal_prompt", re.compile(
        r"\b(reveal|print|show|repeat|output|leak)\s+(me\s+)?(your|the)\s+(system\s+prompt|hidden\s+instructions|initial\s+instructions|instructions\s+above)", _I)),
    ("role_header", re.compile(r"(^|\n)\s*(#+\s*)?(system|assistant)\s*:[ \t]*\S[^\n]{0,60}", _I)),
    ("template_token", re.compile(r"<\|(im_start|im_end|system|endoftext|eot_id|start_header_id)\|>|\[/?INST\]|<</?SYS>>")),
    ("hidden_comment", re.compile(
        r"(<!--|/\*|//|#)[^\n]{0,80}?\b(ai|assistant|llm|language\s+model|chatbot|chatgpt)\b[^\n]{0,80}?"
        r"\b(ignore|disregard|must|always|never|instructions?|obey)\b", _I)),
]


@dataclass
class Finding:
    path: str
    line: int
    field: str       # the JSON field path, or "" for a plain text line
    rule: str
    phrase: str      # the matched text

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" + (f" [{self.field}]" if self.field else "")
        return f"{where}: {self.rule}: {self.phrase!r}"


def _strings(value, path: str = "") -> Iterator[tuple[str, str]]:
    """(field path, string) for every string inside a JSON value."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, f"{path}[{i}]")


def scan_text(text: str) -> list[tuple[str, str]]:
    """(rule, matched phrase) for every pattern that matches `text` (first match per rule)."""
    found = []
    for rule, pattern in PATTERNS:
        m = pattern.search(text)
        if m and rule not in [r for r, _ in found]:
            found.append((rule, " ".join(m.group(0).split())))
    return found


def scan_file(path: str | Path) -> Iterator[Finding]:
    """Findings in a text or JSONL file, line by line. A JSONL line that does not parse is scanned as text."""
    path = str(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(path, None, f"cannot open: {e.strerror}") from None
    with f:
        for line_no, raw in enumerate(f, start=1):
            text = raw.decode("utf-8", errors="replace")
            try:
                fields = list(_strings(json.loads(text))) if text.lstrip().startswith(("{", "[")) else [("", text)]
            except json.JSONDecodeError:
                fields = [("", text)]
            for field, value in fields:
                for rule, phrase in scan_text(value):
                    yield Finding(path, line_no, field, rule, phrase)


def summary(findings: list[Finding], path: str) -> str:
    lines_hit = len({f.line for f in findings})
    by_rule = Counter(f.rule for f in findings)
    rules = ", ".join(f"{r} {n}" for r, n in by_rule.most_common()) or "none"
    return f"scan {path}: {len(findings)} finds on {lines_hit} lines ({rules})"

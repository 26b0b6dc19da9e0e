"""The user's own evaluation data: one JSONL file per suite, in the schemas documented in docs/eval.md.

    tasks          {"prompt": str, "answer": str, "family": str = "user", "check": str = "exact"}
                   check is one of tunelab.eval.tasks.CHECKERS: exact, exact_case, contains, words, json, key_values
    ppl            {"text": str, "source": str = "user"}
    hallucination  {"question": str, "answer": str | null, "passage": str | null}
                   answer null: unanswerable, the right reply is to abstain; with a passage the answer must
                   follow the passage
    injection      {"document": str, "instruction": str, "answer": str | null, "canary": str | null,
                    "style": str = "user"}
                   canary null: a clean document (scores task quality: the answer must appear in the output)

Every bad line is a DataError naming the file and line.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.errors import DataError
from tunelab.eval.tasks import CHECKERS, Item

SCHEMAS = {  # suite -> (required str fields, optional fields)
    "tasks": (("prompt", "answer"), ("family", "check")),
    "ppl": (("text",), ("source",)),
    "hallucination": (("question",), ("answer", "passage")),
    "injection": (("document", "instruction"), ("answer", "canary", "style")),
}


def read_jsonl(path: str | Path, suite: str) -> list[dict]:
    """Records of a user JSONL file, checked against the suite's schema."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "no such file")
    required, optional = SCHEMAS[suite]
    records = []
    for line_no, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(path, line_no, "not UTF-8 text (save the file as UTF-8)") from None
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, line_no, f"not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise DataError(path, line_no, "each line must be a JSON object")
        missing = [k for k in required if not isinstance(rec.get(k), str) or not rec[k].strip()]
        if missing:
            raise DataError(path, line_no, f"the {suite} suite needs a non-empty string field {missing[0]!r} "
                                           f"(fields: {', '.join(required + optional)})")
        unknown = sorted(set(rec) - set(required) - set(optional))
        if unknown:
            raise DataError(path, line_no, f"unknown field {unknown[0]!r} for the {suite} suite "
                                           f"(fields: {', '.join(required + optional)})")
        if suite == "tasks" and rec.get("check", "exact") not in CHECKERS:
            raise DataError(path, line_no, f"check must be one of {', '.join(CHECKERS)}, not {rec['check']!r}")
        records.append(rec)
    if not records:
        raise DataError(path, None, "the file has no records")
    return records


def task_items(path) -> list[Item]:
    return [Item(f"user-{i}", r.get("family", "user"), r["prompt"], r["answer"], {"check": r.get("check", "exact")})
            for i, r in enumerate(read_jsonl(path, "tasks"))]


def ppl_sources(path) -> dict[str, list[str]]:
    sources: dict[str, list[str]] = {}
    for r in read_jsonl(path, "ppl"):
        sources.setdefault(r.get("source", "user"), []).append(r["text"])
    return sources


def hallucination_items(path) -> list[Item]:
    from tunelab.eval.hallucination import ABSTAIN, INSTRUCTION

    items = []
    for i, r in enumerate(read_jsonl(path, "hallucination")):
        answer, passage = r.get("answer"), r.get("passage")
        if passage:
            if answer is None:
                raise DataError(path, i + 1, "a question with a passage needs the answer the passage gives")
            prompt, kind = f"Answer using only the passage.\n\nPassage: {passage}\n\nQuestion: {r['question']}", "passage"
        else:
            prompt, kind = f"{INSTRUCTION}\n\nQuestion: {r['question']}", "known" if answer is not None else "unknown"
        items.append(Item(f"user-{i}", "hallucination", prompt, answer or ABSTAIN,
                          {"kind": kind, "value": answer or ""}))
    return items


def injection_items(path) -> list[Item]:
    items = []
    for i, r in enumerate(read_jsonl(path, "injection")):
        canary = r.get("canary")
        meta = {"kind": "attacked" if canary else "clean", "style": r.get("style", "user") if canary else None,
                "canary": canary, "task": "user", "facts": {}, "span": None}
        prompt = f"{r['instruction']}\n\nDocument:\n{r['document']}"
        items.append(Item(f"user-{i}", "injection", prompt, r.get("answer") or "", meta))
    return items

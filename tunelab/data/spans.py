"""Span records -> token BIO labels, in overlapping windows (data.task: spans).

Two record layouts (auto-detected per record):
  char spans  {"text": str, "spans": [{"start": int, "end": int, "label": str}, ...]}   [start, end) characters
  token tags  {"tokens": [str, ...], "tags": ["O" | "B-<label>" | "I-<label>", ...]}    one tag per word
A token-tag record becomes char spans over the words joined by single spaces, so both go one path.

Label ids (the classifier's outputs): 0 = O, 1 + 2k = B-<labels[k]>, 2 + 2k = I-<labels[k]>. A token is
labelled when its character range (the tokenizer's offset mapping) overlaps a span: the first such token B,
the rest I. A document longer than seq_len is cut into windows of seq_len tokens that overlap by `stride`
tokens; the overlap is context only (label -100 there in every window but the first), so each token is
labelled, and at evaluation predicted, exactly once: by the first window that covers it, the one that gives
a left-to-right decoder the most context before it.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from tunelab.data.sources import iter_rows
from tunelab.errors import ConfigError, DataError

IGNORE = -100


@dataclass
class SpanDoc:
    text: str
    spans: list[tuple[int, int, str]]  # (start, end, label), characters
    where: tuple  # (path, line) for errors


def tag_names(labels: list[str]) -> list[str]:
    """["O", "B-x", "I-x", "B-y", ...]: the classifier's output names in label-id order."""
    return ["O"] + [f"{p}-{lab}" for lab in labels for p in ("B", "I")]


def _from_tags(row: dict) -> tuple[str, list[tuple[int, int, str]]]:
    tokens, tags = row["tokens"], row.get("tags")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise ValueError("field 'tokens' must be a list of strings")
    if not isinstance(tags, list) or len(tags) != len(tokens):
        raise ValueError(f"field 'tags' must be a list with one tag per token ({len(tokens)} tokens)")
    text, spans, pos, open_ = "", [], 0, None  # open_: [start, end, label] of the span being read
    for i, (word, tag) in enumerate(zip(tokens, tags)):
        start = pos + (1 if i else 0)
        text += (" " if i else "") + word
        pos = start + len(word)
        if not isinstance(tag, str) or not (tag == "O" or tag[:2] in ("B-", "I-") and len(tag) > 2):
            raise ValueError(f"tags[{i}] is {tag!r}: use O, B-<label> or I-<label>")
        if tag[:2] == "I-" and open_ and open_[2] == tag[2:]:
            open_[1] = pos
            continue
        if tag[:2] == "I-":
            raise ValueError(f"tags[{i}] is {tag!r} but the previous tag is not B-/I-{tag[2:]}")
        if open_:
            spans.append(tuple(open_))
        open_ = [start, pos, tag[2:]] if tag != "O" else None
    if open_:
        spans.append(tuple(open_))
    return text, spans


def parse_record(row: dict, labels: list[str] | None = None) -> tuple[str, list[tuple[int, int, str]]]:
    """(text, sorted spans) of one record; ValueError saying what is wrong (the caller adds file:line)."""
    if "tokens" in row and "spans" in row:
        raise ValueError("the record has both 'spans' and 'tokens': use one layout (text+spans or tokens+tags)")
    if "tokens" in row:
        text, spans = _from_tags(row)
    elif "text" in row and "spans" in row:
        text, raw = row["text"], row["spans"]
        if not isinstance(text, str):
            raise ValueError(f"field 'text' is {type(text).__name__}, expected a string")
        if not isinstance(raw, list):
            hint = " (a CSV cell is text: write span records as JSONL or Parquet)" if isinstance(raw, str) else ""
            raise ValueError(f"field 'spans' is {type(raw).__name__}, expected a list of {{start, end, label}}{hint}")
        spans = []
        for i, s in enumerate(raw):
            if not isinstance(s, dict) or not all(k in s for k in ("start", "end", "label")):
                raise ValueError(f"spans[{i}] must be an object with start, end and label, got {s!r}")
            a, b, lab = s["start"], s["end"], s["label"]
            if type(a) is not int or type(b) is not int or not isinstance(lab, str) or not lab.strip():
                raise ValueError(f"spans[{i}]: start and end must be integers and label a non-empty string, got {s!r}")
            if not 0 <= a < b <= len(text):
                raise ValueError(f"spans[{i}] [{a}, {b}) is outside the text (0..{len(text)}) or empty")
            spans.append((a, b, lab))
    else:
        raise ValueError(f"a span record needs text+spans or tokens+tags, got fields {sorted(row)}")
    spans.sort()
    for lab in {s[2] for s in spans}:
        same = [s for s in spans if s[2] == lab]
        for x, y in zip(same, same[1:]):
            if y[0] < x[1]:
                raise ValueError(f"spans [{x[0]}, {x[1]}) and [{y[0]}, {y[1]}) of label {lab!r} overlap: merge them")
    if labels is not None:
        bad = sorted({s[2] for s in spans} - set(labels))
        if bad:
            raise ValueError(f"unknown label {bad[0]!r}: data.labels declares {labels}; add it there or fix the record")
    return text, spans


def builtin_records(name: str) -> list[dict]:
    """The records of a seeded builtin span set `local:<name>` (tunelab.data.sources.SPAN_SOURCES)."""
    if name.startswith("pii-"):
        from tunelab.data.pii import span_records
    else:
        from tunelab.eval.injection import span_records
    return span_records(name)


def read_docs(path: str, fmt: str = "auto", labels: list[str] | None = None) -> list[SpanDoc]:
    """Every record of a source as a SpanDoc; a bad record is a DataError naming file and line."""
    docs = []
    for line, row in iter_rows(path, fmt):
        try:
            text, spans = parse_record(row, labels)
        except ValueError as e:
            raise DataError(path, line, str(e)) from None
        docs.append(SpanDoc(text, spans, (path, line)))
    return docs


def split_docs(cfg, seed: int) -> tuple[list[SpanDoc], list[SpanDoc], list[SpanDoc]]:
    """(train, validation, test) documents of a spans data section: validation is data.eval_path or a
    seeded eval_fraction of the sources; test is data.test_path (empty when unset)."""
    train, val = [], []
    rng = random.Random(seed)
    for src in cfg.sources:
        docs = read_docs(src.path, src.format, cfg.labels)
        rng.shuffle(docs)
        n_eval = 0 if cfg.eval_path else round(cfg.eval_fraction * len(docs))
        val += docs[:n_eval]
        train += docs[n_eval:]
    if cfg.eval_path:
        val = read_docs(cfg.eval_path, "auto", cfg.labels)
    test = read_docs(cfg.test_path, "auto", cfg.labels) if cfg.test_path else []
    return train, val, test


def label_list(cfg, docs: list[SpanDoc] | None = None) -> list[str]:
    """data.labels, else the labels found in the data (sorted)."""
    if cfg.labels:
        return list(cfg.labels)
    docs = docs if docs is not None else [d for part in split_docs(cfg, cfg.seed) for d in part]
    found = sorted({s[2] for d in docs for s in d.spans})
    if not found:
        raise ConfigError("data.task=spans: no span in the data and no data.labels: nothing to detect")
    return found


def label_counts(docs: list[SpanDoc]) -> str:
    """One line: spans per label and documents without any span."""
    counts = Counter(s[2] for d in docs for s in d.spans)
    parts = [f"{lab} {n}" for lab, n in sorted(counts.items())]
    return f"spans per label: {', '.join(parts) or 'none'}; documents without spans: {sum(not d.spans for d in docs)}"


def token_tags(offsets: list[tuple[int, int]], spans: list[tuple[int, int, str]], labels: list[str]) -> list[int]:
    """The label id of each token from its (start, end) character offsets."""
    tags = [0] * len(offsets)
    for a, b, lab in spans:
        k = labels.index(lab)
        first = True
        for i, (s, e) in enumerate(offsets):
            if s < b and e > a and tags[i] == 0:  # a token already in another label's span keeps that one
                tags[i] = 1 + 2 * k if first else 2 + 2 * k
                first = False
    return tags


def windows(n: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_labelled) token ranges covering n tokens: windows of seq_len overlapping by
    stride; the overlap [start, first_labelled) of every window but the first is context only."""
    if stride >= seq_len:
        raise ConfigError(f"data.stride={stride} must be smaller than train.seq_len={seq_len}")
    out, start = [], 0
    while True:
        end = min(start + seq_len, n)
        out.append((start, end, start if not out else out[-1][1]))
        if end >= n:
            return out
        start = end - stride


def encode_doc(doc: SpanDoc, tokenizer, labels: list[str], seq_len: int, stride: int):
    """(input_ids, offsets, tags, windows) of one document (tags over the whole document)."""
    enc = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]
    return ids, offsets, token_tags(offsets, doc.spans, labels), windows(len(ids), seq_len, stride)


def rows(docs: list[SpanDoc], tokenizer, labels: list[str], seq_len: int, stride: int) -> list[dict]:
    """Training rows {"input_ids", "labels", "position_ids"}: one per window, labels -100 on the overlap."""
    out = []
    for doc in docs:
        ids, _, tags, wins = encode_doc(doc, tokenizer, labels, seq_len, stride)
        for a, b, first in wins:
            if b > a:
                out.append({"input_ids": ids[a:b], "labels": [IGNORE] * (first - a) + tags[first:b],
                            "position_ids": list(range(b - a))})
    return out

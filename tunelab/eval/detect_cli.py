"""`tunelab detect RUN --input docs.jsonl --out spans.jsonl [--redact]`: run a trained span detector.

RUN is a folder of a `data.task: spans` run. Each input line is an object with a text field; each output
line is that object plus "spans": [{"start", "end", "label", "score", "text"}, ...] (character offsets into
the text; score = the mean probability of the label over the span's tokens), detected with the
post-processing the run chose on its validation split (each label its own, where chosen per label).
`--redact` adds "redacted": the text with every span replaced by [LABEL].
"""

from __future__ import annotations

import json


def add_arguments(p) -> None:
    p.add_argument("run", metavar="RUN", help="a finished run folder of data.task=spans")
    p.add_argument("--input", required=True, help="JSONL documents, one object with a text field per line")
    p.add_argument("--out", required=True, help="JSONL to write: each input object plus its spans")
    p.add_argument("--text-field", default="text", help="which field holds the document (default: text)")
    p.add_argument("--redact", action="store_true", help='also write "redacted": the text with spans masked')


def run(args) -> int:
    from pathlib import Path

    from tunelab.data.sources import field_text, iter_rows
    from tunelab.eval.spans import detect, redact
    from tunelab.train.spans import open_detector

    rows = [(line, row) for line, row in iter_rows(args.input, "jsonl")]
    texts = [field_text(row, args.text_field, args.input, line) for line, row in rows]
    model, tok, info = open_detector(args.run)
    found = detect(model, tok, texts, info["labels"], info["seq_len"], info["stride"], info["postprocess"])
    with open(Path(args.out), "w", encoding="utf-8") as f:
        for (_, row), text, spans in zip(rows, texts, found):
            rec = {**row, "spans": spans, **({"redacted": redact(text, spans)} if args.redact else {})}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    n = sum(map(len, found))
    print(f"{n} spans in {len(texts)} documents -> {args.out}")
    return 0

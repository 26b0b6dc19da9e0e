"""Reading sources: text/Markdown files, code folders, JSONL/JSON/CSV/Parquet, saved Hugging Face datasets.

Everything is a lazy iterator, so a corpus larger than memory streams through: JSONL and CSV are read line
by line, Parquet through `datasets` in streaming mode, a saved HF dataset memory-mapped by `datasets`.
A bad row raises `DataError(path, line, message)`; with `skip_bad_rows=True` it is skipped and the error is
appended to the caller's `skipped` list instead, so the caller can count and show them.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path

from tunelab.errors import DataError

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
LOCAL_PREFIX = "local:"
# seeded span-detection sets (tunelab.data.spans.builtin_records): injections and personal data
SPAN_SOURCES = ("injection-spans", "injection-spans-val", "injection-spans-heldout",
                "pii-spans", "pii-spans-val", "pii-spans-heldout")


def detect_format(path: str | Path, extensions: list[str] | tuple[str, ...] = (".py",)) -> str:
    """The reading format for `path`: by suffix for a file; for a folder `hf` (a saved dataset), else
    `code` when it holds files with one of `extensions`, else `text`."""
    p = Path(path)
    if not p.exists():
        raise DataError(path, None, "no such file or folder")
    if p.is_dir():
        if (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file():
            return "hf"
        if any(f.suffix in extensions for f in p.rglob("*")):
            return "code"
        return "text"
    suffix = p.suffix.lower()
    if suffix in SUFFIX_FORMATS:
        return SUFFIX_FORMATS[suffix]
    if suffix in TEXT_SUFFIXES or suffix in extensions:
        return "text"
    raise DataError(path, None, f"cannot tell the format from suffix {suffix!r}: set format: jsonl|json|csv|parquet|text|code|hf")


def read_records(
    path: str | Path, format: str = "auto", text_field: str = "text", skip_bad_rows: bool = False,
    skipped: list[DataError] | None = None, extensions: list[str] | tuple[str, ...] = (".py",),
) -> Iterator[dict]:
    """Yield each record (a dict) of `path`. Text and code files give `{text_field: content}` per file.
    Bad rows raise DataError naming file and line, or are skipped (appended to `skipped`) if asked."""
    for _, record in iter_rows(path, format, text_field, skip_bad_rows, skipped, extensions):
        yield record


def iter_rows(
    path: str | Path, format: str = "auto", text_field: str = "text", skip_bad_rows: bool = False,
    skipped: list[DataError] | None = None, extensions: list[str] | tuple[str, ...] = (".py",),
) -> Iterator[tuple[int | None, dict]]:
    """Like `read_records`, with each record's 1-based line (or row) number, None for whole files."""
    path = str(path)
    if path.startswith(LOCAL_PREFIX) and path[len(LOCAL_PREFIX):] in SPAN_SOURCES:
        from tunelab.data.spans import builtin_records

        yield from ((i, r) for i, r in enumerate(builtin_records(path[len(LOCAL_PREFIX):]), start=1))
        return
    if path.startswith(LOCAL_PREFIX):
        from tunelab.data.corpus import local_corpus

        yield from ((None, r) for r in local_corpus(path[len(LOCAL_PREFIX):]))
        return
    fmt = detect_format(path, extensions) if format == "auto" else format
    readers = {"jsonl": _jsonl, "json": _json, "csv": _csv, "parquet": _parquet, "hf": _hf}
    if fmt in ("text", "code"):
        rows = _files(path, text_field, extensions if fmt == "code" else TEXT_SUFFIXES + tuple(extensions))
    elif fmt in readers:
        rows = readers[fmt](path)
    else:
        raise DataError(path, None, f"unknown format {fmt!r}")
    count = 0
    for line, row in _guard(path, rows, skip_bad_rows, skipped):
        count += 1
        yield line, row
    if count == 0 and not skipped:
        raise DataError(path, None, "no records: the file is empty (or the folder holds no readable files)")


def _guard(path, rows, skip_bad_rows, skipped):
    """Pass rows through; a reader yields a DataError in place of a bad row, which is raised or skipped."""
    for line, row in rows:
        if isinstance(row, DataError):
            if not skip_bad_rows:
                raise row
            if skipped is not None:
                skipped.append(row)
            continue
        yield line, row


def _decode(path, line, raw: bytes) -> str | DataError:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return DataError(path, line, f"not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); re-encode the file as UTF-8")


def _jsonl(path):
    with open(path, "rb") as f:
        for line, raw in enumerate(f, start=1):
            text = _decode(path, line, raw)
            if isinstance(text, DataError) or not text.strip():
                if isinstance(text, DataError):
                    yield line, text
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                yield line, DataError(path, line, f"malformed JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(row, dict):
                yield line, DataError(path, line, f"expected a JSON object per line, got {type(row).__name__}")
                continue
            yield line, row


def _json(path):
    """A JSON file holding a list of objects (or {"data": [...]}); rows are numbered, not lines."""
    raw = Path(path).read_bytes()
    text = _decode(path, None, raw)
    if isinstance(text, DataError):
        raise text
    if not text.strip():
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, f"malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(path, None, f"expected a list of objects (or {{'data': [...]}}), got {type(data).__name__}")
    for i, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            yield i, DataError(path, f"record {i}", f"expected an object, got {type(row).__name__}")
        else:
            yield i, row


def _csv(path):
    """CSV with a header row; decoded line by line so a bad byte names its line. Line = the row's last line."""
    bad: list[DataError] = []

    def lines():
        with open(path, "rb") as f:
            for line, raw in enumerate(f, start=1):
                text = _decode(path, line, raw)
                if isinstance(text, DataError):
                    bad.append(text)
                    yield "\n"  # keep csv's line count in step with the file
                else:
                    yield text

    reader = csv.reader(lines())
    header = next(reader, None)
    if bad:
        yield 1, bad.pop()
    if header is None:
        return
    for row in reader:
        if bad:
            yield reader.line_num, bad.pop()
            continue
        if not row:
            continue
        if len(row) != len(header):
            yield reader.line_num, DataError(path, reader.line_num, f"{len(row)} fields, the header has {len(header)}")
            continue
        yield reader.line_num, dict(zip(header, row))


def _arrow_errors() -> tuple[type[BaseException], ...]:
    import pyarrow

    return (OSError, ValueError, pyarrow.ArrowException)


def _parquet(path):
    import datasets
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(path)  # a cut-short or mislabelled file fails here, before `datasets` logs about it
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True)
        yield from enumerate(ds, start=1)
    except _arrow_errors() as e:
        raise DataError(path, None, f"cannot read as Parquet: {str(e).splitlines()[0]}") from None


def _hf(path):
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except _arrow_errors() as e:
        raise DataError(path, None, f"cannot read as a saved Hugging Face dataset: {str(e).splitlines()[0]}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(path, None, f"a saved DatasetDict without a 'train' split (has {list(ds)})")
        ds = ds["train"]
    # to_iterable_dataset reads the memory-mapped Arrow shards lazily, row by row.
    yield from enumerate(ds.to_iterable_dataset(), start=1)


def _files(path, text_field, suffixes):
    """One record per file: a single file, or every file with one of `suffixes` under a folder (sorted)."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
    for f in files:
        text = _decode(f, None, f.read_bytes())
        if isinstance(text, DataError):
            yield None, text
        elif text.strip():
            yield None, {text_field: text, "path": os.path.relpath(f, p) if p.is_dir() else f.name}


def field_text(record: dict, field: str, path, line) -> str:
    """The string in `record[field]`, or a DataError that says what the row holds instead."""
    if field not in record:
        raise DataError(path, line, f"missing field {field!r} (the row has {sorted(record)}); set text_field")
    value = record[field]
    if not isinstance(value, str):
        raise DataError(path, line, f"field {field!r} is {type(value).__name__}, expected a string")
    return value

"""Reading sources: text/Markdown files, code folders, JSONL/JSON/CSV/Parquet, saved Hugging Face datasets,
and Hugging Face Hub dataset ids (`owner/name`, through the Hugging Face cache: tunelab.hub).

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
from tunelab.hub import HUB_ID, snapshot

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
LOCAL_PREFIX = "local:"
# seeded span-detection sets (tunelab.data.spans.builtin_records): injections and personal data
SPAN_SOURCES = ("injection-spans", "injection-spans-val", "injection-spans-heldout",
                "pii-spans", "pii-spans-val", "pii-spans-heldout")
# seeded preference sets from the standard library's docstrings (tunelab.data.preference.builtin_records)
PREFERENCE_SOURCES = ("preference", "preference-unpaired")

# What a Hub dataset needs from its repository: data files and the README whose YAML header names its
# subsets and splits. Loading scripts (*.py) are never fetched, so never run.
DATASET_FILES = ["README.md", "*.parquet", "*.jsonl", "*.jsonl.gz", "*.json", "*.csv", "*.txt", "*.arrow"]


def is_hub_id(path: str | Path) -> bool:
    """Whether `path` names a Hub dataset: `owner/name`, and no local file or folder has that name."""
    return HUB_ID.fullmatch(str(path)) is not None and not Path(path).exists()


def hub_dataset(repo_id: str, revision: str | None = None) -> Path:
    """The snapshot folder of a Hub dataset in the Hugging Face cache, downloaded first when online."""
    return snapshot(repo_id, revision, DATASET_FILES, repo_type="dataset", field="data path",
                    revision_field="the source's revision")


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
    skipped: list[DataError] | None = None, extensions: list[str] | tuple[str, ...] = (".py",), **hub,
) -> Iterator[dict]:
    """Yield each record (a dict) of `path`. Text and code files give `{text_field: content}` per file.
    Bad rows raise DataError naming file and line, or are skipped (appended to `skipped`) if asked."""
    for _, record in iter_rows(path, format, text_field, skip_bad_rows, skipped, extensions, **hub):
        yield record


def iter_rows(
    path: str | Path, format: str = "auto", text_field: str = "text", skip_bad_rows: bool = False,
    skipped: list[DataError] | None = None, extensions: list[str] | tuple[str, ...] = (".py",),
    revision: str | None = None, split: str = "train", subset: str | None = None,
) -> Iterator[tuple[int | None, dict]]:
    """Like `read_records`, with each record's 1-based line (or row) number, None for whole files.
    `revision`, `split`, `subset`: which snapshot, split and subset (config) of a Hub dataset id to read."""
    path = str(path)
    if path.startswith(LOCAL_PREFIX) and path[len(LOCAL_PREFIX):] in SPAN_SOURCES:
        from tunelab.data.spans import builtin_records

        yield from ((i, r) for i, r in enumerate(builtin_records(path[len(LOCAL_PREFIX):]), start=1))
        return
    if path.startswith(LOCAL_PREFIX) and path[len(LOCAL_PREFIX):] in PREFERENCE_SOURCES:
        from tunelab.data.preference import builtin_records

        yield from ((i, r) for i, r in enumerate(builtin_records(path[len(LOCAL_PREFIX):]), start=1))
        return
    if path.startswith(LOCAL_PREFIX):
        from tunelab.data.corpus import local_corpus

        yield from ((None, r) for r in local_corpus(path[len(LOCAL_PREFIX):]))
        return
    fmt = format
    if fmt == "auto":
        fmt = "hub" if is_hub_id(path) else detect_format(path, extensions)
    readers = {"jsonl": _jsonl, "json": _json, "csv": _csv, "parquet": _parquet, "hf": _hf}
    if fmt == "hub":
        rows = _hub(path, revision, split, subset)
    elif fmt in ("text", "code"):
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
    try:
        yield from _csv_rows(path, reader, bad)
    except csv.Error as e:  # e.g. a bare carriage return inside an unquoted field: the reader cannot go on
        yield reader.line_num, DataError(path, reader.line_num, f"not valid CSV ({e}); quote fields that hold line breaks")


def _csv_rows(path, reader, bad: list[DataError]):
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


def _hub(repo_id: str, revision: str | None, split: str, subset: str | None):
    """The rows of one split of a Hub dataset, read by `datasets` from its cached snapshot folder, streaming
    (datasets' own layout rules: data/<split>-*.parquet, <split>.jsonl, subsets named in the README)."""
    import datasets

    folder = hub_dataset(repo_id, revision)
    try:
        ds = datasets.load_dataset(str(folder), name=subset, split=split, streaming=True)
    except (*_arrow_errors(), datasets.exceptions.DatasetNotFoundError) as e:
        where = f"{repo_id}{f'@{revision}' if revision else ''} ({folder})"
        raise DataError(repo_id, None, f"cannot read split {split!r}{f' of subset {subset!r}' if subset else ''} "
                        f"of {where}: {str(e).splitlines()[0]}") from None
    yield from enumerate(ds, start=1)


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

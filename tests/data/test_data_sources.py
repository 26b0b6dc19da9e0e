"""Reading sources: every format, and bad input as a clear DataError naming file and line (or skipped)."""

import json

import pytest

from tunelab.cli import main
from tunelab.data.config import SourceConfig
from tunelab.data.mixture import iter_texts
from tunelab.data.sources import detect_format, read_records
from tunelab.errors import DataError

ROWS = [{"text": "alpha beta", "n": 1}, {"text": "gamma delta", "n": 2}, {"text": "épsilon ζeta", "n": 3}]


def _jsonl(path, lines):
    path.write_bytes(b"".join(line if isinstance(line, bytes) else (line + "\n").encode() for line in lines))
    return path


def test_each_format_reads_the_same_rows(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    _jsonl(tmp_path / "a.jsonl", [json.dumps(r) for r in ROWS])
    (tmp_path / "a.json").write_text(json.dumps(ROWS), encoding="utf-8")
    (tmp_path / "a.csv").write_text("text,n\n" + "".join(f'"{r["text"]}",{r["n"]}\n' for r in ROWS), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "a.parquet")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "hf"))
    for name, fmt in [("a.jsonl", "jsonl"), ("a.json", "json"), ("a.csv", "csv"), ("a.parquet", "parquet"), ("hf", "hf")]:
        assert detect_format(tmp_path / name) == fmt
        texts = [r["text"] for r in read_records(tmp_path / name)]
        assert texts == [r["text"] for r in ROWS], name


def test_text_and_code_folders(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\nbody", encoding="utf-8")
    (tmp_path / "docs" / "b.txt").write_text("plain", encoding="utf-8")
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "pkg" / "m.py").write_text("x = 1\n", encoding="utf-8")
    (tmp_path / "src" / "pkg" / "m.rs").write_text("fn main() {}\n", encoding="utf-8")
    (tmp_path / "src" / "notes.txt").write_text("not code", encoding="utf-8")
    assert [r["text"] for r in read_records(tmp_path / "docs")] == ["# Title\nbody", "plain"]
    assert detect_format(tmp_path / "src") == "code"
    assert [r["path"] for r in read_records(tmp_path / "src", extensions=[".py", ".rs"])] == ["pkg/m.py", "pkg/m.rs"]


@pytest.mark.parametrize(
    "lines, line_no, words",
    [
        (['{"text": "ok"}', '{"text": "broken'], 2, "malformed JSON"),
        (['{"text": "ok"}', "[1, 2]"], 2, "expected a JSON object"),
        (['{"text": "ok"}', '{"body": "no text"}'], 2, "missing field 'text'"),
        (['{"text": 5}'], 1, "field 'text' is int"),
        ([b'{"text": "ok"}\n', b'{"text": "caf\xe9"}\n'], 2, "not UTF-8"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, lines, line_no, words):
    path = _jsonl(tmp_path / "bad.jsonl", lines)
    src = SourceConfig(name="s", path=str(path))
    with pytest.raises(DataError) as err:
        list(iter_texts(src))
    assert f"{path}:{line_no}:" in str(err.value) and words in str(err.value)
    assert err.value.line == line_no
    skipped = []
    texts = list(iter_texts(src, skip_bad_rows=True, skipped=skipped))
    assert len(skipped) == 1 and skipped[0].line == line_no
    assert len(texts) == len(lines) - 1


def test_empty_file_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match="empty"):
        list(read_records(path))


def test_csv_bad_row_names_its_line(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b"text,n\nfine,1\n\xff\xfe,2\nshort\n")
    with pytest.raises(DataError, match=r"a.csv:3: not UTF-8"):
        list(read_records(path))
    skipped = []
    assert [r["text"] for r in read_records(path, skip_bad_rows=True, skipped=skipped)] == ["fine"]
    assert [e.line for e in skipped] == [3, 4]


def test_cli_bad_input_is_one_line_and_keeps_existing_output(tmp_path, capsys):
    bad = _jsonl(tmp_path / "bad.jsonl", ['{"text": "a fine document of enough length"}', "{oops"])
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    assert main(["data", "filter", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}:2: malformed JSON" in err and "Traceback" not in err
    assert out.read_text() == "precious\n"           # untouched
    assert list(tmp_path.glob("*.tmp")) == []         # no temp file left behind
    assert main(["data", "filter", str(bad), "--out", str(out), "--skip-bad-rows"]) == 0
    assert "skipped 1 bad rows" in capsys.readouterr().out
    assert [json.loads(x)["text"] for x in out.read_text().splitlines()] == ["a fine document of enough length"]


def test_corrupt_parquet_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"this is not parquet at all")
    with pytest.raises(DataError, match=r"bad.parquet: cannot read as Parquet"):
        list(read_records(path))


class _FillingDisk:
    """A text file on a disk that fills: ENOSPC once more than `room` characters were written ("write"), or
    only when the buffer is flushed ("flush"), as a buffered file on a real full disk usually reports it."""

    def __init__(self, real, room: int, at: str):
        self.real, self.room, self.at = real, room, at

    def _full(self):
        import errno

        raise OSError(errno.ENOSPC, "No space left on device")

    def write(self, text):
        self.room -= len(text)
        if self.at == "write" and self.room < 0:
            self._full()
        return self.real.write(text)

    def flush(self):
        if self.at == "flush":
            self._full()
        self.real.flush()

    def __getattr__(self, name):  # fileno, close, closed
        return getattr(self.real, name)


@pytest.mark.parametrize("at", ["write", "flush"])
@pytest.mark.parametrize("existing", [True, False])
def test_cli_disk_full_is_one_line_and_leaves_no_partial_output(tmp_path, capsys, monkeypatch, at, existing):
    import os

    src = _jsonl(tmp_path / "in.jsonl", [json.dumps({"text": f"document number {i} with enough text to keep"})
                                         for i in range(200)])
    out = tmp_path / "out.jsonl"
    if existing:
        out.write_text("precious\n")
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda *a, **k: _FillingDisk(real_fdopen(*a, **k), 1000, at))
    assert main(["data", "filter", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"error: no space left on device while writing {out}" in err, err
    assert (out.read_text() == "precious\n") if existing else not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"] + (["out.jsonl"] if existing else [])
    monkeypatch.undo()
    assert main(["data", "filter", str(src), "--out", str(out)]) == 0  # with room again, the same command works
    assert len(out.read_text().splitlines()) == 200


def test_csv_with_a_bare_carriage_return_is_a_data_error(tmp_path):
    """csv.reader stops on a carriage return inside an unquoted field (found by tests/project/test_fuzz.py): the
    reader reports the file and line as data, not a csv.Error traceback; skip_bad_rows skips the rest."""
    path = tmp_path / "d.csv"
    path.write_bytes(b"text,b\nok,1\nbro\rken,2\n")
    with pytest.raises(DataError, match=r"d\.csv:3: not valid CSV"):
        list(read_records(path))
    skipped = []
    assert list(read_records(path, skip_bad_rows=True, skipped=skipped)) == [{"text": "ok", "b": "1"}]
    assert len(skipped) == 1

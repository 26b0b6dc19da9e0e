"""The data section is checked before the model loads: a bad path, record or template is one line naming
file and line, exit 2, and the model loader is never called (issue 25)."""

from __future__ import annotations

import json
import shutil

import pytest

import tunelab.train.run as run_mod
from tests.support.tiny_run import make_workspace, run_config
from tunelab.cli import main
from tunelab.data.config import DataConfig
from tunelab.data.validate import check
from tunelab.errors import DataError


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("validate"), records=16)


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test: the error must come before it."""
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(run_mod, "build_model", boom)
    monkeypatch.setattr(run_mod, "load_pretrained", boom)


def _one_line_error(argv, capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tunelab train: error: ") and "Traceback" not in err
    return err


def test_bad_data_path_fails_before_the_model_loads(ws, tmp_path, capsys, no_model, monkeypatch):
    def no_tokenizer(*a, **k):
        raise AssertionError("the tokenizer was loaded before the data paths were checked")

    monkeypatch.setattr(run_mod, "load_tokenizer", no_tokenizer)
    missing = tmp_path / "no-such.jsonl"
    cfg = run_config(ws, tmp_path / "run", data={"sources": [{"name": "x", "path": str(missing)}]})
    err = _one_line_error(["train", str(cfg), "--no-progress"], capsys)
    assert f"{missing}: no such file or folder" in err
    assert not (tmp_path / "run").exists()


def test_bad_record_names_file_and_line_before_the_model_loads(ws, tmp_path, capsys, no_model):
    data = tmp_path / "sft.jsonl"
    rows = (ws / "sft.jsonl").read_text().splitlines()
    rows[2] = json.dumps({"prompt": "Reverse: a b", "answer": "b a"})  # `answer` is no SFT field
    data.write_text("\n".join(rows) + "\n")
    cfg = run_config(ws, tmp_path / "run", data={"sources": [{"name": "x", "path": str(data)}]})
    err = _one_line_error(["train", str(cfg), "--no-progress"], capsys)
    assert f"{data}:3: unknown SFT record layout" in err
    text = tmp_path / "t.jsonl"
    text.write_text(json.dumps({"body": "some text"}) + "\n")
    cfg = run_config(ws, tmp_path / "run", data={"task": "pretrain", "sources": [{"name": "x", "path": str(text)}]})
    assert f"{text}:1: missing field 'text'" in _one_line_error(["train", str(cfg), "--no-progress"], capsys)


def test_template_that_rewrites_the_answer_fails_before_the_model_loads(ws, tmp_path, capsys, no_model):
    model = tmp_path / "model"
    shutil.copytree(ws / "model", model)
    tc = json.loads((model / "tokenizer_config.json").read_text())
    # an assistant message rendered upper-case: the labels would not be the response's tokens
    upper = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + (m['content'] | upper if m['role'] == "
             "'assistant' else m['content']) + '<|im_end|>\\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    tc["chat_template"] = upper
    (model / "tokenizer_config.json").write_text(json.dumps(tc))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    cfg = run_config(ws, tmp_path / "run", model={"source": str(model)})
    err = _one_line_error(["train", str(cfg), "--no-progress"], capsys)
    assert f"{ws / 'sft.jsonl'}:1: the chat template rewrites the assistant's text" in err


def test_check_passes_good_data_and_reads_eval_path(ws, tmp_path, tiny_tokenizer):
    cfg = DataConfig(sources=[{"name": "x", "path": str(ws / "sft.jsonl")}])
    check(cfg)
    check(cfg, tiny_tokenizer)
    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        check(cfg.model_copy(update={"eval_path": str(tmp_path / "missing.jsonl")}))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        check(DataConfig(sources=[{"name": "x", "path": str(bad)}]))
    check(DataConfig(sources=[{"name": "x", "path": str(bad)}], skip_bad_rows=True))  # the build skips it

"""Prepared data (`tunelab data prepare`): memory-mapped shards equal to the on-the-fly build, a manifest that
a changed source or tokenizer invalidates, and runs (first launch with data.prepared, and every resume)
that reuse it without tokenizing (issue 25)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import tunelab.data.pipeline as pipeline
import tunelab.data.sft as sft
from tests.support.tiny_models import make_tiny_tokenizer
from tests.support.tiny_run import make_workspace, run_config
from tunelab.cli import main
from tunelab.config import load_config
from tunelab.data import prepared
from tunelab.models.load import load_tokenizer


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("prepared"), records=48)


@pytest.fixture
def tokenize_calls(monkeypatch):
    """Counts every tokenizing call of the data build (an SFT record, a batch of pretraining texts)."""
    calls = {"sft": 0, "texts": 0, "build": 0}

    def counted(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(sft, "encode", counted("sft", sft.encode))
    monkeypatch.setattr(pipeline, "build", counted("build", pipeline.build))
    real_encoder = pipeline.batch_encoder
    monkeypatch.setattr(pipeline, "batch_encoder", lambda *a, **k: counted("texts", real_encoder(*a, **k)))
    return calls


@pytest.mark.parametrize("task", ["sft", "pretrain"])
def test_prepared_rows_equal_the_on_the_fly_build(ws, tmp_path, task, capsys):
    data = {"packing": "packed", "eval_fraction": 0.1}
    if task == "pretrain":  # texts from the SFT file's prompts, packed across rows
        data |= {"task": "pretrain", "sources": [{"name": "p", "path": "local:prose"}], "max_tokens": 6000}
    cfg_path = run_config(ws, tmp_path / "run", data=data)
    out = tmp_path / "prep"
    assert main(["data", "prepare", str(cfg_path), "--out", str(out), "--num-proc", "2"]) == 0
    assert f"tunelab train {cfg_path} data.prepared={out}" in capsys.readouterr().out
    cfg = load_config(cfg_path)
    built = pipeline.build(cfg.data, load_tokenizer(ws / "model"), cfg.train.seq_len, cfg.train.seed)  # 1 process
    manifest = json.loads((out / "manifest.json").read_text())
    train, eval_ = prepared.load(out, manifest)
    assert len(train) == len(built.train) > 10 and len(eval_) == len(built.eval) > 0
    assert list(train) == built.train and list(eval_) == built.eval  # ids, labels, position ids: every one
    assert train[3:7] == built.train[3:7] and train[-1] == built.train[-1]
    for f in sorted(out.glob("*.npy")):
        assert np.load(f, allow_pickle=False).dtype in (np.int32, np.int64)  # plain arrays, no pickles
    fp = manifest["fingerprint"]
    assert fp["data"]["task"] == task and fp["tokenizer_sha256"] and fp["tunelab"]
    assert (fp["chat_template_sha256"] is None) == (task == "pretrain")
    assert all(len(s["sha256"]) == 64 for s in fp["sources"])


def test_changed_source_or_tokenizer_invalidates_the_manifest(ws, tmp_path, capsys, tokenize_calls):
    src = tmp_path / "sft.jsonl"
    shutil.copy(ws / "sft.jsonl", src)
    cfg = load_config(run_config(ws, tmp_path / "run", data={"sources": [{"name": "rev", "path": str(src)}]}))
    tok, folder = load_tokenizer(ws / "model"), tmp_path / "prep"
    args = (cfg.data, tok, cfg.train.seq_len, cfg.train.seed, folder)
    first, _ = prepared.load_or_build(*args)
    n = tokenize_calls["sft"]
    again, _ = prepared.load_or_build(*args)
    assert tokenize_calls["sft"] == n and "reusing the prepared data" in capsys.readouterr().out
    assert list(again) == first
    src.write_text(src.read_text() + json.dumps({"prompt": "Reverse: alpha omega kappa sigma",
                                                 "response": "sigma kappa omega alpha"}) + "\n")
    rebuilt, _ = prepared.load_or_build(*args)
    assert f"rebuilding the prepared data in {folder}: source 'rev' ({src}) changed" in capsys.readouterr().out
    assert len(rebuilt) == len(first) + 1 and tokenize_calls["sft"] > n
    other = make_tiny_tokenizer(vocab_size=400)  # another vocabulary: other ids
    assert prepared.check(folder, prepared.fingerprint(cfg.data, other, cfg.train.seq_len, 0)) == (
        None, "the tokenizer changed")
    template = cfg.data.model_copy(update={"template": "plain"})
    assert prepared.check(folder, prepared.fingerprint(template, tok, cfg.train.seq_len, 0))[1] == \
        "the chat template changed"
    assert prepared.check(folder, prepared.fingerprint(cfg.data, tok, 32, 0))[1] == "train.seq_len changed"
    scoring = cfg.data.model_copy(update={"postprocess": "pooled"})  # how spans are scored, not what rows hold
    assert prepared.check(folder, prepared.fingerprint(scoring, tok, cfg.train.seq_len, 0))[0] is not None
    (folder / "train-00000.labels.npy").write_bytes(b"cut")
    assert prepared.check(folder, prepared.fingerprint(*args[:4]))[1] == "train-00000.labels.npy is missing or cut short"


def test_runs_reuse_prepared_data_and_resume_never_tokenizes(ws, tmp_path, capsys, tokenize_calls):
    out = tmp_path / "run"
    cfg = run_config(ws, out, train={"max_steps": 4})
    assert main(["train", str(cfg), "--no-progress"]) == 0
    assert tokenize_calls["sft"] > 0 and (out / "prepared" / "manifest.json").is_file()
    tokenize_calls.update(sft=0, texts=0, build=0)
    capsys.readouterr()
    assert main(["train", str(cfg), "--no-progress", "resume=true", "train.max_steps=6"]) == 0
    text = capsys.readouterr().out
    assert tokenize_calls == {"sft": 0, "texts": 0, "build": 0}
    assert f"reusing the prepared data in {out / 'prepared'}" in text and "resumed from" in text
    # a folder made by `tunelab data prepare`, given as data.prepared: the first launch does not tokenize either
    prep = tmp_path / "prep"
    assert main(["data", "prepare", str(cfg), "--out", str(prep)]) == 0
    tokenize_calls.update(sft=0, texts=0, build=0)
    assert main(["train", str(cfg), "--no-progress", f"data.prepared={prep}", f"output_dir={tmp_path / 'run2'}"]) == 0
    assert tokenize_calls == {"sft": 0, "texts": 0, "build": 0}
    first_loss = lambda run: json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["loss"]  # noqa: E731
    assert first_loss(tmp_path / "run2") == first_loss(out)  # same rows, same seed: the same first step

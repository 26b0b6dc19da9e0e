"""Run hygiene: every run gets its own folder, an explicit output_dir holding a run is never silently
replaced, and checkpoints are written during a run by default (issue 25)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.support.tiny_run import make_workspace, run_config
from tunelab.cli import main
from tunelab.config import load_config
from tunelab.train import checkpoint, outdir
from tunelab.train.loop import save_interval


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("outdir"), records=32)


def _files(run: Path) -> dict:
    """What a finished run left: its metrics text and the adapter's bytes."""
    return {"metrics": (run / "metrics.jsonl").read_text(),
            "adapter": (run / "adapter" / "adapter_model.safetensors").read_bytes()}


def test_each_run_gets_its_own_folder_and_latest_follows(ws, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = run_config(ws, tmp_path / "sft", output_dir=None)
    assert main(["train", str(cfg), "--no-progress"]) == 0
    first = sorted(Path("runs").glob("sft-*"))
    assert len(first) == 1 and os.readlink("runs/latest") == first[0].name
    kept = _files(first[0])
    assert main(["train", str(cfg), "--no-progress", "train.lr=2e-2"]) == 0
    runs = sorted(Path("runs").glob("sft-*"))
    assert len(runs) == 2 and os.readlink("runs/latest") == runs[1].name
    assert _files(runs[0]) == kept  # the first run is untouched
    assert _files(runs[1])["metrics"] != kept["metrics"]
    assert load_config(runs[1] / "config.yaml").output_dir == str(runs[1])  # the config names its folder
    # eval/export read runs/latest: it is the newest run folder
    assert _files(Path("runs/latest")) == _files(runs[1])
    # resume=true with no output_dir continues the newest run of this config, it does not start a new one
    assert main(["train", str(cfg), "--no-progress", "resume=true"]) == 0
    assert len(list(Path("runs").glob("sft-*"))) == 2 and "resuming the newest run" in capsys.readouterr().out


def test_same_second_runs_do_not_share_a_folder(tmp_path):
    a, b = outdir.new_run_dir("x", tmp_path), outdir.new_run_dir("x", tmp_path)
    assert a != b and a.is_dir() and b.is_dir()


def test_explicit_output_dir_holding_a_run_is_refused(ws, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    cfg = run_config(ws, out)
    assert main(["train", str(cfg), "--no-progress"]) == 0
    kept = _files(out)
    import tunelab.train.run as run_mod

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the output folder was checked")

    with monkeypatch.context() as m:
        m.setattr(run_mod, "build_model", no_model)
        capsys.readouterr()
        assert main(["train", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"output_dir {out} already holds a finished run" in err and "resume=true" in err and "--overwrite" in err
    assert _files(out) == kept
    # --overwrite replaces it: a new run with a new curve, and no checkpoint of the old run left behind
    (out / "notes.txt").write_text("mine")  # not a run file: kept
    assert main(["train", str(cfg), "--no-progress", "--overwrite", "train.lr=2e-2", "train.max_steps=2"]) == 0
    assert _files(out)["metrics"] != kept["metrics"] and (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in checkpoint.list_complete(out / "checkpoints")] == ["step-00000001", "step-00000002"]
    assert main(["train", str(cfg), "--no-progress", "--overwrite", "resume=true"]) == 2
    assert "give one" in capsys.readouterr().err


def test_checkpoints_are_written_during_a_run_by_default(ws, tmp_path):
    assert load_config(None, [], base={"data": {"sources": [{"name": "x", "path": "x"}]}}).train.save_every == "auto"
    assert [save_interval("auto", n) for n in (3, 10, 95, 100_000)] == [1, 1, 10, 500]
    assert save_interval(0, 100) == 0 and save_interval(7, 100) == 7
    out = tmp_path / "run"
    assert main(["train", str(run_config(ws, out, train={"max_steps": 4, "keep_last": 10})), "--no-progress"]) == 0
    steps = [json.loads((p / "state.json").read_text())["step"] for p in checkpoint.list_complete(out / "checkpoints")]
    assert steps == [1, 2, 3, 4]  # auto: ceil(4 / 10) = every step; the old default kept only step 4

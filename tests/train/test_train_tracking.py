"""train.tracking: MLflow beside TensorBoard, through the real `tunelab train` CLI, against tests/support/fake_mlflow.py
(the calls of MLflow's fluent API that tunelab makes, with MLflow's rules on them; mlflow itself is not a test
dependency)."""

from __future__ import annotations

import json
import sys

import pytest

from tests.support import fake_mlflow
from tests.support.tiny_run import make_workspace, run_config
from tunelab.cli import main


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("track"), records=64)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_mlflow_gets_params_metrics_and_artifacts_and_resume_continues_the_run(ws, tmp_path, monkeypatch):
    mlflow = fake_mlflow.install(monkeypatch)
    out = tmp_path / "run"
    cfg = run_config(ws, out, data={"eval_fraction": 0.1},
                     train={"tracking": ["tensorboard", "mlflow"], "eval_every": 2, "save_every": 1})
    assert main(["train", str(cfg), "--no-progress"]) == 0
    assert ("set_tracking_uri", (out / "mlruns").resolve().as_uri()) in mlflow.calls  # the run folder's store
    assert ("set_experiment", "tunelab") in mlflow.calls
    (run_id, run), = mlflow.runs.items()
    assert run["status"] == "FINISHED" and run["name"] == out.name
    assert json.loads((out / "mlflow.json").read_text())["run_id"] == run_id
    assert run["params"]["train.lr"] == "0.01" and run["params"]["method"] == "lora"
    assert run["params"]["lora.target_modules"] == "all-linear" and run["params"]["output_dir"] == str(out)
    rows = _metrics(out)
    assert run["metrics"]["loss"] == [(r["step"], r["loss"]) for r in rows]
    assert run["metrics"]["eval_loss"] == [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    assert {"summary.json", "config.yaml", "metrics.jsonl", "loss.png"} <= {f for p, f in run["artifacts"] if p is None}
    assert ("adapter", "adapter_model.safetensors") in run["artifacts"]

    assert main(["train", str(cfg), "resume=true", "train.max_steps=5", "--no-progress"]) == 0
    assert list(mlflow.runs) == [run_id] and ("start_run", run_id, None) in mlflow.calls  # the same MLflow run
    assert [s for s, _ in run["metrics"]["loss"]] == [1, 2, 3, 4, 5]


def test_tracking_can_leave_tensorboard_out(ws, tmp_path):
    out = tmp_path / "quiet"
    assert main(["train", str(run_config(ws, out, train={"tracking": [], "max_steps": 1})), "--no-progress"]) == 0
    assert not (out / "tensorboard").exists() and (out / "metrics.jsonl").is_file()


def test_mlflow_not_installed_is_one_line_before_the_model_loads(ws, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    out = tmp_path / "none"
    assert main(["train", str(run_config(ws, out, train={"tracking": ["mlflow"]})), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "pip install mlflow-skinny" in err and "Traceback" not in err
    assert not (out / "metrics.jsonl").exists()

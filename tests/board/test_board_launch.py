"""`tunelab board`'s launch, stop and resume (tunelab/board/launch.py) and the guards on every request that
changes state: the start-up token, the Host header, the Origin header, trust_remote_code, paths outside
RUNS_DIR. The real run is the tiny 2-layer random Llama of tests/tiny_run.py, started as a subprocess."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("starlette", reason="the board's server: pip install 'tunelab[board]'")

from starlette.testclient import TestClient  # noqa: E402

from tests.support.board_fixtures import board_runs  # noqa: E402,F401
from tunelab.board.app import create_app, split_host  # noqa: E402
from tunelab.train import status  # noqa: E402

TOKEN = {"X-Board-Token": "secret"}


@pytest.fixture()
def configs(board_runs, tmp_path):  # noqa: F811
    """A configs folder beside RUNS_DIR with the tiny run's config (its output_dir left for the board to set)."""
    cfg = yaml.safe_load((board_runs.parent / "tiny.yaml").read_text())
    cfg.pop("output_dir")
    cfg["train"] |= {"max_steps": 3000, "save_every": 3, "log_every": 1}  # long enough to stop in the middle
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "configs" / "remote.yaml").write_text(yaml.safe_dump(cfg | {"model": cfg["model"] | {"trust_remote_code": True}}))
    return tmp_path / "configs"


@pytest.fixture()
def client(board_runs, configs):  # noqa: F811
    app = create_app(board_runs, token="secret", port=7860, configs=configs)
    yield TestClient(app, base_url="http://127.0.0.1:7860")
    for job in app.state.launcher.jobs.values():  # never leave a training process behind
        if job.proc.poll() is None:
            app.state.launcher.stop(job.name)


def _until(what, timeout=180.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = what()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what.__doc__ or what}")


def _steps(run: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_split_host():
    assert split_host("127.0.0.1:7860") == ("127.0.0.1", 7860)
    assert split_host("[::1]:7860") == ("::1", 7860) and split_host("[::1]") == ("::1", 80)
    assert split_host("LocalHost") == ("localhost", 80) and split_host("x:y") == ("x", None)


def test_refusals(client, board_runs, configs):  # noqa: F811
    """Each guard on its own: the rest of the request is a valid launch."""
    body = {"config": str(configs / "tiny.yaml"), "overrides": ["train.max_steps=2"], "name": "refused"}

    def launch(json_body=body, headers=TOKEN, c=client):
        r = c.post("/api/launch", json=json_body, headers=headers)
        return r.status_code, r.json()["error"]

    assert launch(headers={})[0] == 403 and "X-Board-Token" in launch(headers={})[1]
    assert launch(headers={"X-Board-Token": "wrong"})[0] == 403
    app = client.app
    for host in ("evil.example:7860", "127.0.0.1:7861", "localhost"):  # another name (DNS rebinding), another port
        code, err = launch(c=TestClient(app, base_url=f"http://{host}"))
        assert code == 400 and "Host header" in err
    for origin in ("http://evil.example", "http://127.0.0.1:9999", "null"):
        code, err = launch(headers=TOKEN | {"Origin": origin})
        assert code == 403 and "another site" in err
    assert client.get("/api/runs", headers={"Origin": "http://evil.example"}).status_code == 403  # reads too
    assert client.post("/api/jobs").status_code == 405
    code, err = launch(body | {"config": str(configs / "remote.yaml")})
    assert code == 400 and "trust_remote_code" in err
    code, err = launch(body | {"overrides": ["model.trust_remote_code=true"]})
    assert code == 400 and "trust_remote_code" in err
    outside = board_runs.parent / "tiny.yaml"  # a real config, but neither in RUNS_DIR nor in the configs folder
    for config in (str(outside), "../" * 12 + str(outside)[1:], str(configs / ".." / "x" / ".." / ".." / "tiny.yaml")):
        code, err = launch(body | {"config": config})
        assert code == 403 and "outside" in err, config
    for name in ("../escape", "/abs", "a/../../b", ".hidden", "tiny"):
        code, err = launch(body | {"name": name})
        assert code in (400, 403, 409) and err, name
    assert launch(body | {"name": "tiny"})[0] == 409  # an existing run is resumed, never launched over
    for bad in (["--overwrite"], ["output_dir=/tmp/x"], ["resume=true"], "train.lr=1"):
        assert launch(body | {"overrides": bad})[0] == 400, bad
    code, err = launch(body | {"overrides": ["train.lr=-1"]})
    assert code == 400 and "train.lr" in err  # RunConfig's own check, before anything starts
    assert client.post("/api/stop", json={"name": "tiny"}, headers=TOKEN).status_code == 409  # not started here
    code = client.post("/api/resume", json={"name": "tiny"}, headers=TOKEN)
    assert code.status_code == 409 and "finished" in code.json()["error"]
    assert client.post("/api/resume", json={"name": "../x"}, headers=TOKEN).status_code == 400
    assert not (board_runs / "refused").exists() and client.get("/api/jobs").json()["jobs"] == []


def test_form_fields_and_configs(client, configs):
    d = client.get("/api/configs").json()
    fields = {f["key"]: f for f in d["fields"]}
    assert fields["method"]["choices"] == ["full", "freeze", "lora", "qlora"] and fields["train.lr"]["default"] == 2e-4
    assert "trust_remote_code" in fields["model.trust_remote_code"]["key"] and "output_dir" not in fields
    assert "Python code" in fields["model.trust_remote_code"]["doc"]  # the field's docstring, from config.py
    shown = {c["path"]: c["where"] for c in d["configs"]}
    assert shown[str(configs / "tiny.yaml")] == "configs" and any(w == "runs" for w in shown.values())


def test_cost_is_tunelab_costs_estimate(client, board_runs, configs, capsys):  # noqa: F811
    """The estimate shown before a launch is `tunelab cost` on the config's model, method, batch and lengths."""
    from tunelab.cli import main

    c = client.post("/api/cost", json={"config": str(configs / "tiny.yaml"), "overrides": ["train.batch_size=2"]},
                    headers=TOKEN).json()
    cfg = yaml.safe_load(c["config"])
    assert (cfg["train"]["batch_size"], cfg["method"]) == (2, "lora")
    model = str(board_runs.parent / "model")
    assert c["command"] == ["tunelab", "cost", model, "--method", "lora", "--batch-size", "2", "--seq-len", "64",
                            "--rank", "4", "--quant-block", "64", "--loss-chunk", "256"]
    assert main([*c["command"][1:], "--json", str(configs.parent / "ref.json")]) == 0
    capsys.readouterr()
    assert c["rows"] == json.loads((configs.parent / "ref.json").read_text())
    assert c["rows"][0]["trainable"] > 0
    freeze = client.post("/api/cost", json={"config": str(configs / "tiny.yaml"), "overrides": ["method=freeze"]},
                         headers=TOKEN).json()
    assert "freeze has no estimate" in freeze["error"] and "method: freeze" in freeze["config"]


def test_launch_stop_resume(client, board_runs, configs):  # noqa: F811
    run = board_runs / "launched"
    j = client.post("/api/launch", json={"config": str(configs / "tiny.yaml"), "name": "launched",
                                         "overrides": ["train.keep_last=2"]}, headers=TOKEN).json()
    assert j["state"] == "running" and j["command"][-3:] == [f"output_dir={run}", "resume=false", "--no-progress"]
    assert client.post("/api/launch", json={"config": str(configs / "tiny.yaml"), "name": "launched"},
                       headers=TOKEN).status_code == 409

    def stoppable():
        """a checkpoint past step 3 while the launched process runs"""
        st = status.read(run) or {}
        return st.get("pid") == j["pid"] and st.get("step", 0) >= 4 and list((run / "checkpoints").glob("step-*/manifest.json"))
    _until(stoppable)
    row = {r["name"]: r for r in client.get("/api/runs").json()["runs"]}["launched"]
    assert row["status"] == "running" and row["method"] == "lora"
    stopped = client.post("/api/stop", json={"name": "launched"}, headers=TOKEN).json()
    assert stopped["state"] == "stopped" and stopped["returncode"] == -15  # SIGTERM
    row = {r["name"]: r for r in client.get("/api/runs").json()["runs"]}["launched"]
    assert row["status"] == "resumable" and 0 < row["step"] < 3000
    ckpt = int(client.get("/api/run", params={"name": "launched"}).json()["checkpoints"][-1]["step"])

    r = client.post("/api/resume", json={"name": "launched"}, headers=TOKEN).json()
    assert r["pid"] != j["pid"] and r["command"][-3:] == [f"output_dir={run}", "resume=true", "--no-progress"]

    def resumed():
        """the resumed process three steps past its checkpoint"""
        st = status.read(run) or {}
        return st.get("pid") == r["pid"] and st.get("step", 0) >= ckpt + 3
    _until(resumed)
    assert client.post("/api/stop", json={"name": "launched"}, headers=TOKEN).json()["state"] == "stopped"
    log = (run / "train.log").read_text()
    assert f"resumed from {run / 'checkpoints'}" in log and f"(step {ckpt} of 3000)" in log
    steps = _steps(run)  # the curve continues: lines past the checkpoint were dropped, no step twice
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= ckpt + 3
    jobs = client.get("/api/jobs").json()["jobs"]
    assert [(x["name"], x["state"], x["pid"]) for x in jobs] == [("launched", "stopped", r["pid"])]
    assert not os.path.exists(f"/proc/{r['pid']}")  # reaped, not a zombie

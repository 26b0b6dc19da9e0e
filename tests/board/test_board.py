"""`tunelab board`: the JSON API (Starlette's TestClient) on a real tiny run, the status file, and bad input."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the board's server: pip install 'tunelab[board]'")

from starlette.testclient import TestClient  # noqa: E402

from tests.support.board_fixtures import board_runs, copy_run  # noqa: E402,F401
from tests.support.tiny_run import losses  # noqa: E402
from tunelab.board.app import create_app  # noqa: E402
from tunelab.train import status  # noqa: E402


@pytest.fixture()
def client(board_runs):  # noqa: F811
    return TestClient(create_app(board_runs, token="secret"), base_url="http://127.0.0.1:7860")


def _row(client, name):
    return next(r for r in client.get("/api/runs").json()["runs"] if r["name"] == name)


def test_runs_table_reads_the_run(client, board_runs):  # noqa: F811
    r = _row(client, "tiny")
    rows = [json.loads(l) for l in (board_runs / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert (r["method"], r["data"], r["step"], r["total_steps"], r["status"]) == ("lora", "rev", 6, 6, "finished")
    assert r["final_loss"] == losses(board_runs / "tiny")[-1]
    assert r["eval_loss"] == rows[-1]["eval_loss"] and r["problems"] == []
    d = client.get("/api/run", params={"name": "tiny"}).json()
    assert [c["name"] for c in d["checkpoints"]] == sorted(p.name for p in (board_runs / "tiny" / "checkpoints").iterdir())
    assert d["checkpoints"][-1]["step"] == 6
    assert d["outputs"][0]["name"] == "adapter" and "adapter_config.json" in d["outputs"][0]["files"]
    assert d["config"]["method"] == "lora" and "method: lora" in d["config_text"]


def test_status_file_of_a_finished_run(board_runs):  # noqa: F811
    st = status.read(board_runs / "tiny")
    assert (st["state"], st["step"], st["total_steps"], st["pid"]) == ("finished", 6, 6, os.getpid())


def test_status_failed_and_killed(tmp_path):
    with pytest.raises(RuntimeError), status.tracking(tmp_path):
        status.beat(tmp_path, 3, 10)
        raise RuntimeError("boom\nsecond line")
    st = status.read(tmp_path)
    assert (st["state"], st["step"], st["error"]) == ("failed", 3, "RuntimeError: boom")
    from tunelab.board.runs import run_state

    assert run_state(tmp_path)["state"] == "failed"
    # a run killed outright: "running" with a pid that no longer exists, and a complete checkpoint
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    status.Status(tmp_path).record  # noqa: B018 - writes "running" for this process
    st = status.read(tmp_path) | {"pid": dead.pid}
    (tmp_path / "status.json").write_text(json.dumps(st))
    assert run_state(tmp_path)["state"] == "failed" and "gone" in run_state(tmp_path)["why"]
    (tmp_path / "checkpoints" / "step-00000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-00000004" / "manifest.json").write_text("{}")
    assert run_state(tmp_path)["state"] == "resumable"
    (tmp_path / "status.json").write_text(json.dumps(st | {"pid": os.getpid()}))
    assert run_state(tmp_path)["state"] == "running"


def test_metrics_are_read_incrementally(client, board_runs):  # noqa: F811
    run = copy_run(board_runs, "tiny", "growing")
    first = client.get("/api/metrics", params={"name": "growing"}).json()
    assert [r["loss"] for r in first["rows"] if "loss" in r] == losses(run) and first["bad_lines"] == []
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.5')  # being written: not a line yet
        f.flush()
        mid = client.get("/api/metrics", params={"name": "growing", "since": first["next"]}).json()
        assert mid["rows"] == [] and mid["next"] == first["next"]
        f.write("}\n")
    last = client.get("/api/metrics", params={"name": "growing", "since": first["next"]}).json()
    assert last["rows"] == [{"step": 7, "loss": 1.5}] and last["next"] == first["next"] + 1


def test_data_view_marks_the_trained_tokens(client, board_runs):  # noqa: F811
    import numpy as np

    d = client.get("/api/data", params={"name": "tiny", "n": 3}).json()
    prep = board_runs / "tiny" / "prepared"
    labels, offsets = np.load(prep / "train-00000.labels.npy"), np.load(prep / "train-00000.offsets.npy")
    responses = {json.loads(l)["response"] for l in (board_runs.parent / "sft.jsonl").read_text().splitlines()}
    for ex in d["examples"]:
        row = labels[offsets[ex["index"]]:offsets[ex["index"] + 1]]
        assert [t[1] for t in ex["tokens"]] == [int(x) != -100 for x in row]
        trained = "".join(t[0] for t in ex["tokens"] if t[1])
        # the mask rule (tunelab.data.sft): the response and the token that closes its turn, nothing else
        assert trained.endswith("<|im_end|>") and trained[: -len("<|im_end|>")] in responses
        assert ex["cut"] is False
    rep = d["report"]
    assert rep["sources"][0]["share_planned"] == 1.0 and rep["sources"][0]["share_realised"] == 1.0
    assert rep["filters"]["seen"] == 64 and rep["train_rows"] == d["rows"]


def test_evaluations_with_intervals(client, board_runs):  # noqa: F811
    from tunelab.eval.report import write_report
    from tunelab.eval.stats import interval, mean

    run = copy_run(board_runs, "tiny", "evaluated")
    scores = {"base": [1, 0, 0, 1, 0, 0, 0, 1], "tuned": [1, 1, 1, 1, 0, 1, 1, 1]}
    results = {k: {"tasks": {"metrics": {"exact match": mean(v)}, "intervals": {"exact match": interval(v)},
                             "items_per_s": 1.0}} for k, v in scores.items()}
    write_report(results, run / "eval", "test")
    quick = {k: {"test": {"scores": v}, "unseen": {"scores": v}, "attack_hits": v, "abstained": v, "eval_loss": 2.0,
                 "prose": {"ppl": 9.0}} for k, v in zip(("before", "after"), scores.values())}
    (run / "quickstart.json").write_text(json.dumps(quick))
    evals = {e["name"]: e for e in client.get("/api/evals", params={"name": "evaluated"}).json()["evals"]}
    table = evals["eval/results.json"]["tables"][0]
    assert table["labels"] == ["base", "tuned"] and table["rows"][0]["rate"]
    for cell, v in zip(table["rows"][0]["cells"], scores.values()):
        assert cell["value"] == pytest.approx(mean(v)) and cell["interval"] == pytest.approx(list(interval(v)))
    q = evals["quickstart.json"]["tables"][0]
    after = q["rows"][0]["cells"][1]
    assert after["value"] == pytest.approx(7 / 8) and after["interval"] == pytest.approx(list(interval(scores["tuned"])))
    assert client.get("/api/run", params={"name": "evaluated"}).json()["evals"] == ["quickstart.json", "eval/results.json"]


def test_chat_streams_base_and_tuned(client, board_runs):  # noqa: F811
    """The base side is the base model's own greedy answer (transformers, no tunelab code in the way)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    msgs = [{"role": "user", "content": "Reverse: alpha beta"}]
    with client.stream("POST", "/api/chat", headers={"X-Board-Token": "secret"},
                       json={"name": "tiny", "messages": msgs, "max_new_tokens": 6}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    text = {s: "".join(e.get("text", "") for e in events if e.get("side") == s) for s in ("base", "tuned")}
    assert [e["side"] for e in events if e.get("done")] == ["base", "tuned"] and not any("error" in e for e in events)
    folder = board_runs.parent / "model"
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder).eval()
    enc = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), return_tensors="pt",
              add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    assert text["base"] == tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text["tuned"]
    t = client.post("/api/template", headers={"X-Board-Token": "secret"}, json={"name": "tiny", "messages": msgs}).json()
    assert t["template"] == tok.chat_template and t["prompt"].endswith("<|im_start|>assistant\n")


# ---- bad input: each a clear message and a status code, never a crash ----

def test_truncated_metrics_and_missing_config(client, board_runs):  # noqa: F811
    run = copy_run(board_runs, "tiny", "broken")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:3] + ['{"step": 4, "lo'] + lines[4:]) + "\n")
    (run / "config.yaml").unlink()
    r = _row(client, "broken")
    assert "config.yaml is missing" in r["problems"][0] and "line 4" in r["problems"][1]
    m = client.get("/api/metrics", params={"name": "broken"}).json()
    assert m["bad_lines"] == [4] and len(m["rows"]) == len(lines) - 1
    d = client.get("/api/run", params={"name": "broken"})
    assert d.status_code == 200 and d.json()["config_error"] == "config.yaml is missing"
    data = client.get("/api/data", params={"name": "broken"})
    assert data.status_code == 404 and "config.yaml is missing" in data.json()["error"]
    (run / "config.yaml").write_text("method: [unclosed\n")
    assert "cannot be read" in _row(client, "broken")["problems"][0]


@pytest.mark.parametrize("name,code", [("../tiny", 400), ("/etc", 400), ("tiny/../../x", 400), ("nope", 404),
                                       ("outside", 403), ("", 400)])
def test_run_names_stay_inside_runs_dir(client, board_runs, name, code):  # noqa: F811
    link = board_runs / "outside"
    if not link.is_symlink():
        link.symlink_to(board_runs.parent)  # a link planted in RUNS_DIR that leads out of it
    for path in ("/api/run", "/api/metrics", "/api/data", "/api/evals"):
        r = client.get(path, params={"name": name})
        assert r.status_code == code and r.json()["error"]
    assert "outside" not in [r["name"] for r in client.get("/api/runs").json()["runs"]]


def test_files_stay_inside_the_run(client):
    assert client.get("/api/file", params={"name": "tiny", "path": "loss.png"}).headers["content-type"] == "image/png"
    for path, code in (("../../sft.jsonl", 403), ("/etc/passwd", 403), ("checkpoints", 404), ("nope.png", 404)):
        r = client.get("/api/file", params={"name": "tiny", "path": path})
        assert r.status_code == code and r.json()["error"]


def test_host_header_and_token(board_runs):  # noqa: F811
    app = create_app(board_runs, token="secret")
    assert TestClient(app, base_url="http://evil.example:7860").get("/api/runs").status_code == 400
    ok = TestClient(app, base_url="http://localhost:7860")
    assert ok.get("/api/runs").status_code == 200
    body = {"name": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    assert ok.post("/api/chat", json=body).status_code == 403
    assert ok.post("/api/chat", json=body, headers={"X-Board-Token": "wrong"}).status_code == 403
    bad = ok.post("/api/chat", content=b"{not json", headers={"X-Board-Token": "secret"})
    assert bad.status_code == 400 and "not JSON" in bad.json()["error"]
    bad = ok.post("/api/chat", json={"name": "tiny", "messages": "hi"}, headers={"X-Board-Token": "secret"})
    assert bad.status_code == 400 and "messages" in bad.json()["error"]
    assert ok.get("/api/metrics", params={"name": "tiny", "since": "x"}).status_code == 400
    assert "secret" not in ok.get("/").text  # the token is only in the URL the command prints


def test_cli_port_in_use_and_missing_folder(board_runs, capsys):  # noqa: F811
    from tunelab.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        assert main(["board", str(board_runs), "--port", str(s.getsockname()[1])]) == 2
    assert "is in use" in capsys.readouterr().err
    assert main(["board", str(board_runs / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_starting_the_board_imports_no_torch():
    """Why the first page answers quickly: the server's modules leave torch and transformers for first use."""
    code = ("import sys, tunelab.board.cli, tunelab.board.app, uvicorn; "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert out.stdout.strip() == "[]"

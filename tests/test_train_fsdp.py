"""FSDP (train.distributed=fsdp) under torchrun, 2 CPU processes (gloo), against one process: same losses, same
files (checkpoints, adapter, model folder), and a single-process checkpoint resumed sharded."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny_run import losses, make_workspace, run_config
from tunelab.cli import main

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["full", "lora", "qlora"]
TOL = 1e-5  # 2 processes sum gradients in another order: float32 rounding, well under this


def _config(ws: Path, out: Path, method: str, **train) -> Path:
    # batch 4 on one process == batch 2 on each of 2 (token-weighted means, see docs/training.md)
    return run_config(ws, out, method=method, quant={"block_size": 32}, data={"eval_fraction": 0.1},
                      train={"max_steps": 3, "save_every": 2, "keep_last": 3, **train})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: output folder}: `<method>-one` (1 process, batch 4), `<method>-fsdp` (2 processes, batch 2 each),
    and `resumed`: lora-one cut back to its step-2 checkpoint, then resumed under FSDP."""
    d = tmp_path_factory.mktemp("fsdp")
    ws = make_workspace(d, records=96)
    out = {}
    for m in METHODS:
        out[f"{m}-one"] = d / f"{m}-one"
        assert main(["train", str(_config(ws, out[f"{m}-one"], m, batch_size=4)), "--no-progress"]) == 0
    out["resumed"] = d / "resumed"
    shutil.copytree(out["lora-one"], out["resumed"])
    shutil.rmtree(out["resumed"] / "checkpoints" / "step-00000003")
    shutil.rmtree(out["resumed"] / "adapter")
    jobs = []
    for m in METHODS:
        out[f"{m}-fsdp"] = d / f"{m}-fsdp"
        jobs.append(str(_config(ws, out[f"{m}-fsdp"], m, batch_size=2, distributed="fsdp")))
    jobs.append(f"{_config(ws, out['resumed'], 'lora', batch_size=2, distributed='fsdp')} resume=true")
    # PYTHONFAULTHANDLER: a process that crashes (one SIGSEGV seen in a full-suite run) prints its Python stack
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={_free_port()}", str(ROOT / "tests" / "torchrun_train.py"), *jobs],
                          env=env, timeout=600, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-12000:]
    return out


def _files(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and "tensorboard" not in p.parts)


def _assert_same_tensors(a: Path, b: Path) -> None:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys(), a
    for k in x:
        torch.testing.assert_close(y[k], x[k], rtol=0, atol=TOL, msg=f"{a.name}: {k}")


@pytest.mark.parametrize("method", METHODS)
def test_fsdp_matches_one_process(runs, method):
    one, two = runs[f"{method}-one"], runs[f"{method}-fsdp"]
    assert len(losses(two)) == 3 and losses(two) == pytest.approx(losses(one), abs=TOL, rel=0)
    assert _files(two) == _files(one)  # same checkpoints and outputs, same names
    for f in _files(one):
        if f.suffix == ".safetensors":
            _assert_same_tensors(one / f, two / f)
    # each process holds half of every float parameter and AdamW moment (the tiny model's sizes are even);
    # qlora's packed 4-bit weights are not parameters: every process keeps all of them
    b1 = json.loads((one / "summary.json").read_text())["process_bytes"]
    b2 = json.loads((two / "summary.json").read_text())["process_bytes"]
    assert b2["parameters"] == b1["parameters"] // 2
    assert b2["optimizer"] == pytest.approx(b1["optimizer"] / 2, abs=16 * 8)  # the per-parameter `step` scalars


def test_fsdp_resumes_a_single_process_checkpoint(runs):
    one, resumed = runs["lora-one"], runs["resumed"]
    assert json.loads((resumed / "summary.json").read_text())["start_step"] == 2
    assert losses(resumed) == pytest.approx(losses(one), abs=TOL, rel=0)
    _assert_same_tensors(one / "adapter" / "adapter_model.safetensors",
                         resumed / "adapter" / "adapter_model.safetensors")
    _assert_same_tensors(one / "checkpoints" / "step-00000003" / "optimizer.safetensors",
                         resumed / "checkpoints" / "step-00000003" / "optimizer.safetensors")

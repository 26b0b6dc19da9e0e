"""FSDP (train.distributed=fsdp) under torchrun, 2 CPU processes (gloo), against one process: same losses, same
files (checkpoints, adapter, model folder), and a single-process checkpoint resumed sharded.

The one-process twin of 2 processes x batch 2 is batch 2 x grad_accum 2: the same micro-batches, whose
gradients are added in the same pairs, so the results are equal bit for bit (full fine-tuning: within a few
ulps, see below). Batch 4 in one step is checked against it separately: the same sums in another order."""

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

from tests.support.numerics import assert_ulps, assert_within
from tests.support.tiny_run import losses, make_workspace, run_config
from tunelab.cli import main
from tunelab.config import QuantConfig
from tunelab.models.load import load_pretrained
from tunelab.quant import Linear4bit
from tunelab.train.fsdp import block_range

ROOT = Path(__file__).resolve().parents[2]
METHODS = ["full", "lora", "qlora"]
# Batch 4 against batch 2 x grad_accum 2 sums the same token gradients in another order, and 3 AdamW steps
# carry that on; m / sqrt(v) normalises each gradient, so no a-priori bound follows from the sums' bound.
# Largest difference measured: 3.6e-6 (full), 2.1e-6 (qlora), Intel Xeon AVX-512, 2026-12-05.
TOL = 1e-5
# Full fine-tuning under FSDP steps AdamW over flattened shards, another kernel than one process's fused
# AdamW over whole tensors: each step's elementwise update may round differently, a few ulps per step, and
# the next step's gradients and moments move by as much relative to their tensor's largest value (moments
# near zero are sums that cancel, so not per element). Bound: 4 ulps per step, 3 steps, of each tensor's
# largest magnitude (measured here: 1 ulp, Intel Xeon AVX-512, 2026-12-05).
FULL_ULPS = 4 * 3


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
    """{name: output folder}: `<method>-one` (1 process, batch 4), `<method>-accum` (1 process, batch 2 x
    grad_accum 2), `<method>-fsdp` (2 processes, batch 2 each), and `resumed`: lora-accum cut back to its
    step-2 checkpoint, then resumed under FSDP; `qlora-fsdp-recompute`: qlora-fsdp with gradient checkpointing;
    `workspace`: the model and data folder."""
    d = tmp_path_factory.mktemp("fsdp")
    ws = make_workspace(d, records=96)
    out = {"workspace": ws}
    for m in METHODS:
        out[f"{m}-one"] = d / f"{m}-one"
        assert main(["train", str(_config(ws, out[f"{m}-one"], m, batch_size=4)), "--no-progress"]) == 0
        out[f"{m}-accum"] = d / f"{m}-accum"
        cfg = _config(ws, out[f"{m}-accum"], m, batch_size=2, grad_accum=2)
        assert main(["train", str(cfg), "--no-progress"]) == 0
    out["resumed"] = d / "resumed"
    shutil.copytree(out["lora-accum"], out["resumed"])
    shutil.rmtree(out["resumed"] / "checkpoints" / "step-00000003")
    shutil.rmtree(out["resumed"] / "adapter")
    jobs = []
    for m in METHODS:
        out[f"{m}-fsdp"] = d / f"{m}-fsdp"
        jobs.append(str(_config(ws, out[f"{m}-fsdp"], m, batch_size=2, distributed="fsdp")))
    jobs.append(f"{_config(ws, out['resumed'], 'lora', batch_size=2, distributed='fsdp')} resume=true")
    out["qlora-fsdp-recompute"] = d / "qlora-fsdp-recompute"
    jobs.append(str(_config(ws, out["qlora-fsdp-recompute"], "qlora", batch_size=2, distributed="fsdp",
                            gradient_checkpointing=True)))
    # PYTHONFAULTHANDLER: a process that crashes (one SIGSEGV seen in a full-suite run) prints its Python stack
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={_free_port()}", str(ROOT / "tests" / "support" / "torchrun_train.py"), *jobs],
                          env=env, timeout=600, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-12000:]
    return out


def _files(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and "tensorboard" not in p.parts)


def _assert_same_tensors(a: Path, b: Path, ulps: float | None = 0) -> None:
    """Every tensor of file b equals a's: bit for bit (ulps 0), within `ulps` ulps of the tensor's largest
    magnitude, or within TOL (None)."""
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys(), a
    for k in x:
        what = f"{a.name}: {k}"
        if ulps is None:
            torch.testing.assert_close(y[k], x[k], rtol=0, atol=TOL, msg=what)
        elif ulps == 0 or not x[k].is_floating_point():
            assert torch.equal(y[k], x[k]), what
        else:
            assert_within(y[k], x[k], ulps * torch.finfo(x[k].dtype).eps * x[k].abs().max(), what)


@pytest.mark.parametrize("method", METHODS)
def test_fsdp_matches_one_process_with_the_same_micro_batches(runs, method):
    accum, two = runs[f"{method}-accum"], runs[f"{method}-fsdp"]
    ulps = FULL_ULPS if method == "full" else 0
    assert len(losses(two)) == 3
    assert_ulps(torch.tensor(losses(two)), torch.tensor(losses(accum)), ulps, "losses")
    assert _files(two) == _files(accum)  # same checkpoints and outputs, same names
    for f in _files(accum):
        if f.suffix == ".safetensors":
            _assert_same_tensors(accum / f, two / f, ulps)
    # each process holds half of every float parameter and AdamW moment (the tiny model's sizes are even);
    # qlora's packed 4-bit weights are not parameters: test_fsdp_shards_the_4bit_weights checks their shards
    b1 = json.loads((accum / "summary.json").read_text())["process_bytes"]
    b2 = json.loads((two / "summary.json").read_text())["process_bytes"]
    assert b2["parameters"] == b1["parameters"] // 2
    assert b2["optimizer"] == pytest.approx(b1["optimizer"] / 2, abs=16 * 8)  # the per-parameter `step` scalars


@pytest.mark.parametrize("method", METHODS)
def test_gradient_accumulation_matches_one_larger_batch(runs, method):
    """Token-weighted means: batch 2 x grad_accum 2 trains as batch 4 does, to float32 rounding (TOL)."""
    one, accum = runs[f"{method}-one"], runs[f"{method}-accum"]
    assert losses(accum) == pytest.approx(losses(one), abs=TOL, rel=0)
    assert _files(accum) == _files(one)
    for f in _files(one):
        if f.suffix == ".safetensors":
            _assert_same_tensors(one / f, accum / f, ulps=None)


def test_fsdp_resumes_a_single_process_checkpoint(runs):
    accum, resumed = runs["lora-accum"], runs["resumed"]
    assert json.loads((resumed / "summary.json").read_text())["start_step"] == 2
    assert losses(resumed) == losses(accum)
    for f in ("adapter/adapter_model.safetensors", "checkpoints/step-00000003/optimizer.safetensors"):
        _assert_same_tensors(accum / f, resumed / f)


def test_fsdp_shards_the_4bit_weights(runs):
    """qlora: each process stores only its blocks of every 4-bit weight (codes and scales, cut on block
    boundaries, block_range), about half of them; the adapter and losses are those of one process, bit for bit
    (test_fsdp_matches_one_process_with_the_same_micro_batches)."""
    one = json.loads((runs["qlora-accum"] / "summary.json").read_text())["process_bytes"]["quantized"]
    fsdp = json.loads((runs["qlora-fsdp"] / "summary.json").read_text())["process_bytes_by_rank"]
    model, _ = load_pretrained(str(runs["workspace"] / "model"), quant=QuantConfig(block_size=32))
    weights = [m.qweight for m in model.modules() if isinstance(m, Linear4bit)]
    assert one == sum(q.nbytes for q in weights) > 0  # one process: all of them
    assert [b["quantized"] for b in fsdp] == [
        sum(q.blocks(*block_range(q.num_blocks, r, 2)).nbytes for q in weights) for r in range(2)]
    # the bound without the layout: half of everything, plus per weight one block (codes and scale: the halves
    # differ by a block when a weight's block count is odd) and the nested absmax and offset, which every
    # process keeps whole (double quantization)
    slack = sum(q.block_size // 2 + q.scales.element_size() + q.nested_absmax.nbytes + q.offset.nbytes
                for q in weights)
    assert max(b["quantized"] for b in fsdp) <= one / 2 + slack
    assert slack < 0.05 * one


def test_fsdp_qlora_with_gradient_checkpointing(runs):
    """Each decoder layer recomputed in backward gathers its 4-bit weights again: the same training, to TOL."""
    accum, recompute = runs["qlora-accum"], runs["qlora-fsdp-recompute"]
    assert losses(recompute) == pytest.approx(losses(accum), abs=TOL, rel=0)
    _assert_same_tensors(accum / "adapter/adapter_model.safetensors", recompute / "adapter/adapter_model.safetensors",
                         ulps=None)

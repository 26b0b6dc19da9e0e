"""Two torchrun "nodes" on this machine (--nnodes 2, one process each, rendezvous on 127.0.0.1), DDP and
FSDP, against one process on the same micro-batches (batch 2 x grad_accum 2): the same losses and the same
adapter, bit for bit, as tests/train/test_train_fsdp.py finds for one node of two processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.tiny_run import losses, make_workspace
from tests.train.test_train_fsdp import _config, _free_port
from tunelab.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("nodes")
    ws = make_workspace(d, records=96)
    out = {"one": d / "one", "ddp": d / "ddp", "fsdp": d / "fsdp"}
    assert main(["train", str(_config(ws, out["one"], "lora", batch_size=2, grad_accum=2)), "--no-progress"]) == 0
    jobs = [str(_config(ws, out[k], "lora", batch_size=2, distributed=k)) for k in ("ddp", "fsdp")]
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}",
                               str(ROOT / "tests" / "support" / "torchrun_train.py"), *jobs],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-8000:]
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_nodes_match_one_process(runs, mode):
    one, two = runs["one"], runs[mode]
    assert len(losses(two)) == 3 and losses(two) == losses(one)
    a, b = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (one, two))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

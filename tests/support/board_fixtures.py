"""One tiny finished LoRA run (tests/support/tiny_run.py: 2-layer random Llama, 6 steps) under a runs folder, shared
by the board's API and browser tests; plus helpers that make broken copies of it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.tiny_run import make_workspace, run_config


@pytest.fixture(scope="session")
def board_runs(tmp_path_factory) -> Path:
    """RUNS_DIR with one finished run `tiny` (eval loss logged, checkpoints, adapter, prepared data)."""
    from tunelab.cli import main

    d = tmp_path_factory.mktemp("board")
    ws = make_workspace(d)
    (d / "runs").mkdir()
    cfg = run_config(ws, d / "runs" / "tiny", train={"max_steps": 6, "log_every": 1, "save_every": 3},
                     data={"eval_fraction": 0.1})
    cfg = cfg.rename(d / "tiny.yaml")  # the YAML beside the runs folder, not in it
    assert main(["train", str(cfg)]) == 0
    return d / "runs"


def copy_run(runs: Path, name: str, new: str) -> Path:
    shutil.copytree(runs / name, runs / new, symlinks=True)
    return runs / new

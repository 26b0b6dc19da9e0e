"""Crash safety: SIGKILL a real training run at seeded points (inside checkpoint writes and between steps)
and at random times, then resume; the run must continue the same loss curve to the same adapter, and no
partial or damaged folder may ever be taken for a checkpoint.

Runs are forked from this process (which has already imported torch and transformers), so each costs
~1 s instead of a fresh interpreter's import time. The fault seam is tunelab.train.faults (TUNELAB_FAULT).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.tiny_run import losses, make_workspace, run_config
from tunelab.cli import main
from tunelab.train import checkpoint

STEPS = 8
SITES = ["step", "ckpt_weights", "ckpt_optimizer", "ckpt_manifest", "ckpt_rename", "ckpt_prune"]
SITE_TRIALS = 24  # seeded (site, n) faults; every 4th also damages the newest checkpoint before resuming
EXTERNAL_TRIALS = 4  # a SIGKILL from outside at a random time
TRAIN = {"max_steps": STEPS, "save_every": 1, "keep_last": 3, "seq_len": 48}
LORA = {"r": 4, "alpha": 8, "dropout": 0.1}  # dropout: the RNG state must resume too


def _no_plot(metrics, png) -> None:
    """The loss plot (1-2 s of matplotlib per finished run) is not under test here; the metrics it reads are."""


def _child(argv: list[str], fault: str | None, log: str) -> None:
    import tunelab.train.loop

    tunelab.train.loop._plot = _no_plot
    os.environ.pop("TUNELAB_FAULT", None)
    if fault:
        os.environ["TUNELAB_FAULT"] = fault
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _start(cfg: Path, fault: str | None = None, resume: bool = False):
    argv = ["train", str(cfg), "--no-progress"] + (["resume=true"] if resume else [])
    # forkserver: each run forks from a clean server process that has imported what a run needs once, not
    # from this pytest process, whose threads and libraries (after hundreds of tests) make fork unsafe
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, "tunelab.cli", "tunelab.train.run", "tunelab.train.loop",
                                "transformers.models.llama.modeling_llama", "torch.utils.tensorboard"])
    p = ctx.Process(target=_child, args=(argv, fault, str(cfg) + ".log"))
    p.start()
    return p


def _run(cfg: Path, fault: str | None = None, resume: bool = False) -> int:
    p = _start(cfg, fault, resume)
    p.join(300)
    return p.exitcode


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def shm_tmp():
    """Trial folders on tmpfs when there is one: fsync is free there, and a killed process loses nothing
    that the page cache holds, so the crash semantics under test are the same as on disk."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="tunelab-crash-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def setup(shm_tmp):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the tokenizers library and fork
    ws = make_workspace(shm_tmp, records=32)
    ref = ws / "reference"
    assert _run(run_config(ws, ref, train=TRAIN, lora=LORA)) == 0, (Path(str(ref) + ".yaml.log")).read_text()
    assert len(losses(ref)) == STEPS
    yield ws, losses(ref), _adapter(ref)


def _step_of(folder: Path | None) -> int:
    return int(folder.name[len(checkpoint.PREFIX):]) if folder else 0


def _check_after_kill(out: Path, stats: dict) -> int:
    """Every step-* folder must be complete; latest() must return a verified one. Returns its step."""
    root = out / "checkpoints"
    folders = sorted(root.glob("step-*")) if root.is_dir() else []
    partial = [f for f in folders if checkpoint.verify(f) is not None]
    stats["partial_taken"] += sum(1 for f in partial if f == checkpoint.latest(root))
    assert not partial, f"incomplete checkpoint folders after a kill: {partial}"
    last = checkpoint.latest(root)
    assert last is None or checkpoint.verify(last) is None
    return _step_of(last)


def _damage_newest(out: Path, rng: random.Random, stats: dict) -> None:
    """Truncate or flip a byte in the newest checkpoint's weights: latest() must skip it."""
    root = out / "checkpoints"
    folders = checkpoint.list_complete(root)
    if len(folders) < 2:
        return
    w = folders[-1] / "weights.safetensors"
    data = bytearray(w.read_bytes())
    if rng.random() < 0.5:
        data = data[: len(data) // 2]
    else:
        data[rng.randrange(len(data))] ^= 0xFF
    w.write_bytes(bytes(data))
    assert checkpoint.latest(root) == folders[-2]
    stats["damaged_skipped"] += 1


def _assert_same_run(out: Path, ref_losses, ref_adapter, start: int) -> None:
    import json

    assert json.loads((out / "summary.json").read_text())["start_step"] == start
    assert losses(out) == pytest.approx(ref_losses, rel=1e-6, abs=1e-7)
    got = _adapter(out)
    assert got.keys() == ref_adapter.keys()
    for k in got:
        torch.testing.assert_close(got[k], ref_adapter[k], rtol=1e-6, atol=1e-7)


def test_sigkill_at_seeded_fault_sites_then_resume(setup, shm_tmp):
    ws, ref_losses, ref_adapter = setup
    stats = {"kills": 0, "partial_taken": 0, "damaged_skipped": 0, "resumed_same": 0}
    t0 = time.time()
    for trial in range(SITE_TRIALS):
        rng = random.Random(trial)
        out = shm_tmp / f"t{trial}"
        cfg = run_config(ws, out, train=TRAIN, lora=LORA)
        done = 0
        for k in range(1 + (trial % 3 == 2)):  # every 3rd trial is killed twice before it completes
            site = SITES[(trial + k) % len(SITES)]
            n = rng.randint(1, STEPS - done)  # the site is reached once per remaining step
            code = _run(cfg, f"{site}:{n}", resume=k > 0)
            assert code == -signal.SIGKILL, f"trial {trial}: {site}:{n} exit {code}: {Path(str(cfg) + '.log').read_text()[-2000:]}"
            stats["kills"] += 1
            done = _check_after_kill(out, stats)
            if done == STEPS:
                break
        if trial % 4 == 3:
            _damage_newest(out, rng, stats)
        start = _step_of(checkpoint.latest(out / "checkpoints"))
        assert _run(cfg, resume=True) == 0, Path(str(cfg) + ".log").read_text()[-2000:]
        assert not list((out / "checkpoints").glob(".tmp-*")), "a crashed write's temporary folder was left"
        _assert_same_run(out, ref_losses, ref_adapter, start)
        stats["resumed_same"] += 1
    print(f"\ncrash trials: {SITE_TRIALS} run, {stats['kills']} SIGKILLs at fault sites, "
          f"{stats['resumed_same']} resumed to the same curve and adapter, {stats['partial_taken']} partial "
          f"checkpoints taken, {stats['damaged_skipped']} damaged checkpoints skipped "
          f"({time.time() - t0:.0f} s wall)")


def test_external_sigkill_at_random_times_then_resume(setup, shm_tmp):
    ws, ref_losses, ref_adapter = setup
    stats = {"partial_taken": 0}
    killed = 0
    for trial in range(EXTERNAL_TRIALS):
        rng = random.Random(1000 + trial)
        out = shm_tmp / f"x{trial}"
        cfg = run_config(ws, out, train=TRAIN, lora=LORA)
        wait_for, fraction = rng.randint(2, STEPS - 3), rng.random()
        p = _start(cfg)
        folder = out / "checkpoints" / checkpoint.PREFIX
        target, before = Path(f"{folder}{wait_for:08d}"), Path(f"{folder}{wait_for - 1:08d}")
        deadline = time.time() + 120
        while not target.exists() and p.is_alive() and time.time() < deadline:
            time.sleep(0.002)
        try:  # a random time within the next step (the last one's length), so 2+ steps stay to resume
            step_s = target.stat().st_mtime - before.stat().st_mtime
        except FileNotFoundError:
            step_s = 0.05
        time.sleep(fraction * step_s)
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        assert p.exitcode == -signal.SIGKILL, "the run finished before it was killed"
        killed += 1
        start = _check_after_kill(out, stats)
        assert start < STEPS
        assert _run(cfg, resume=True) == 0, Path(str(cfg) + ".log").read_text()[-2000:]
        _assert_same_run(out, ref_losses, ref_adapter, start)
    print(f"\nexternal kills: {EXTERNAL_TRIALS} run, {killed} killed at a random time, {killed} resumed to the "
          f"same curve and adapter, {stats['partial_taken']} partial checkpoints taken")

"""train.early_stopping: the run stops when eval loss stops improving, and best/ holds the best step's weights."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tests.support.tiny_run import make_workspace, run_config
from tunelab.cli import main
from tunelab.config import load_config
from tunelab.errors import ConfigError
from tunelab.train.early_stop import EarlyStopping


def test_patience_and_min_delta():
    s = EarlyStopping(patience=2, min_delta=0.1)
    assert s.update(1, 5.0) and s.best_step == 1           # the first evaluation is the best so far
    assert not s.update(2, 4.95) and not s.stop              # lower, but not by more than min_delta
    assert s.update(3, 4.8) and s.bad == 0                   # better by 0.2: counting starts again
    assert not s.update(4, 4.9) and not s.update(5, 4.75)
    assert s.stop and (s.best_step, s.best_loss) == (3, 4.8)
    again = EarlyStopping(patience=2)
    again.restore(s.state())  # as a resumed run reads it from its checkpoint
    assert (again.best_step, again.best_loss, again.bad, again.stop) == (3, 4.8, 2, True)


def test_needs_evaluations():
    with pytest.raises(ConfigError, match="eval_every > 0"):
        load_config(None, ["data.sources=[{name: a, path: x}]", "train.early_stopping.patience=2"])


def _expected_stop(evals: list[tuple[int, float]], patience: int, min_delta: float):
    """(best step, stop step) replayed from the logged eval losses, independently of EarlyStopping."""
    best, best_step, bad = math.inf, None, 0
    for step, loss in evals:
        if loss < best - min_delta:
            best, best_step, bad = loss, step, 0
        else:
            bad += 1
            if bad == patience:
                return best_step, step
    return best_step, None


def test_run_stops_when_eval_loss_stops_improving_and_keeps_the_best(tmp_path):
    """Full fine-tuning of a tiny Llama at a learning rate high enough that eval loss turns up within a few
    steps; an evaluation and a checkpoint every step. The run ends `patience` evaluations after its best,
    best/ equals the checkpoint of the best step (every tensor, bit for bit) and not the final weights."""
    ws = make_workspace(tmp_path, records=96)
    out = tmp_path / "run"
    cfg = run_config(ws, out, method="full", data={"eval_fraction": 0.1},
                     train={"lr": 0.05, "max_steps": 30, "eval_every": 1, "save_every": 1, "keep_last": 40,
                            "early_stopping": {"patience": 2, "min_delta": 0.01}})
    assert main(["train", str(cfg), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best_step, stop = _expected_stop([(r["step"], r["eval_loss"]) for r in rows], 2, 0.01)
    assert stop is not None and stop < 30 and rows[-1]["step"] == stop  # stopped, and right there
    summary = json.loads((out / "summary.json").read_text())
    es = summary["early_stopping"]
    assert (es["best_step"], es["stopped_early_at"], summary["steps"]) == (best_step, stop, stop)
    assert es["best_eval_loss"] == min(r["eval_loss"] for r in rows)
    assert [r["step"] for r in rows if r.get("best")][-1] == best_step

    best = load_file(out / "best" / "model.safetensors")
    at_best = load_file(out / "checkpoints" / f"step-{best_step:08d}" / "weights.safetensors")
    final = load_file(out / "model" / "model.safetensors")
    assert best.keys() == at_best.keys()
    for name in best:
        assert torch.equal(best[name], at_best[name]), name
    assert any(not torch.equal(best[n], final[n]) for n in best)  # the best step is not the last one

"""tunelab.experiments: grid parser, resumable sweeps, optimum/ratio math on known curves, report, corruption."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.train.test_train_e2e import workspace  # noqa: F401  (the shared tiny model + SFT file fixture)
from tunelab.errors import ConfigError
from tunelab.experiments import grid, quality, sweep
from tunelab.experiments.optimum import find_optimum, lr_ratio
from tunelab.experiments.report import write_report

# ---------------------------------------------------------------------------------------------- grid parser


def test_grid_values_lists_and_ranges():
    axes = grid.parse_grid(["method=full,lora,qlora", "lr=1e-5:1e-2:log4", "batch_size=4,16",
                            "train.weight_decay=0:0.2:lin3", "lr_b=1e-4"])
    assert axes["method"] == ["full", "lora", "qlora"]
    # log4 from 1e-5 to 1e-2: 10^-5, 10^-4, 10^-3, 10^-2, both ends included
    assert axes["train.lr"] == pytest.approx([1e-5, 1e-4, 1e-3, 1e-2], rel=1e-12)
    assert axes["train.batch_size"] == [4, 16] and all(isinstance(v, int) for v in axes["train.batch_size"])
    assert axes["train.weight_decay"] == pytest.approx([0.0, 0.1, 0.2])
    assert axes["lr_b"] == [1e-4] and isinstance(axes["lr_b"][0], float)  # YAML would read "1e-4" as a string
    lrs = grid.parse_values("1e-5:1e-2:log8")
    assert len(lrs) == 8 and lrs[0] == 1e-5 and lrs[-1] == 1e-2
    ratios = np.diff(np.log(lrs))
    assert np.allclose(ratios, math.log(1000) / 7, rtol=1e-3)  # evenly spaced in log (4-digit rounding)


@pytest.mark.parametrize("bad", ["lr", "lr=", "=1,2", "lr=1e-5:1e-2:log1", "lr=0:1e-2:log4", "lr=a:b:lin3",
                                 "method=full,full"])
def test_grid_rejects_bad_axes(bad):
    with pytest.raises(ConfigError):
        grid.parse_grid([bad])


def test_grid_expansion_drops_adapter_keys_for_full():
    axes = grid.parse_grid(["method=full,lora", "rank=4,8", "lr=1e-3,1e-2"])
    cells = grid.expand(axes)
    # full ignores lora.r: 2 lrs; lora: 2 ranks x 2 lrs
    assert len(cells) == 2 + 4
    assert {tuple(sorted(c)) for c in cells if c["method"] == "full"} == {("method", "train.lr")}
    slugs = [grid.slug(c) for c in cells]
    assert len(set(slugs)) == len(slugs) and "method-lora__rank-4__lr-0.001" in slugs
    assert grid.overrides(cells[0]) == ["method=full", "train.lr=0.001"]


# ---------------------------------------------------------------------------------- optimum and ratio math


def _parabola(lrs, center, curvature=0.3, floor=2.0):
    return [floor + curvature * (math.log(lr) - math.log(center)) ** 2 for lr in lrs]


@pytest.mark.parametrize("center", [3.3e-4, 1e-3, 2.2e-3, 5e-4])
def test_optimum_recovers_a_parabola_minimum_exactly(center):
    lrs = grid.parse_values("1e-5:1e-1:log9")
    opt = find_optimum(lrs, _parabola(lrs, center))
    assert opt.trusted and opt.edge is None
    assert opt.lr == pytest.approx(center, rel=1e-9)  # a parabola in log-lr is fit exactly by 3 points
    step = math.log(lrs[1] / lrs[0])
    assert math.log(opt.hi / opt.lo) == pytest.approx(step, rel=1e-3)  # +- half a grid step
    assert opt.lo < center < opt.hi


def test_optimum_on_a_non_parabolic_curve_is_bracketed_and_the_ratio_is_right():
    lrs = grid.parse_values("1e-6:1e-2:log13")
    # asymmetric curves (steeper on the high side, as divergence makes them): minima at 2e-5 and 2e-4
    def curve(c):
        return [1.5 + 0.2 * abs(math.log(lr / c)) ** 1.5 + (0.5 * max(0.0, math.log(lr / c)) ** 2) for lr in lrs]

    full, lora = find_optimum(lrs, curve(2e-5)), find_optimum(lrs, curve(2e-4))
    assert full.lo < 2e-5 < full.hi and lora.lo < 2e-4 < lora.hi
    r = lr_ratio(lora, full)
    assert r.lo < 10 < r.hi and not r.bound
    assert r.value == pytest.approx(10, rel=0.5)


def test_optimum_at_the_grid_edge_is_an_open_bound_and_diverged_points_are_skipped():
    lrs = [1e-4, 1e-3, 1e-2, 1e-1]
    opt = find_optimum(lrs, [3.0, 2.5, 2.0, float("nan")])  # the largest lr diverged
    assert opt.edge == "high" and opt.hi == math.inf and opt.best_lr == 1e-2 and not opt.trusted
    low = find_optimum(lrs, [1.0, 2.0, 3.0, 4.0])
    assert low.edge == "low" and low.lo == 0.0
    r = lr_ratio(opt, low)
    assert r.bound and r.hi == math.inf
    with pytest.raises(ValueError):
        find_optimum(lrs, [float("inf")] * 4)


# ----------------------------------------------------------------------------- sweep: resume and report


@pytest.fixture(scope="module")
def sweep_ws(workspace):
    """test_train_e2e's tiny model + 96 reverse-words pairs, with a base sweep config beside them."""
    cfg = {"method": "lora", "model": {"source": str(workspace / "model")}, "lora": {"r": 4, "alpha": 8},
           "quant": {"block_size": 32},
           "data": {"task": "sft", "sources": [{"name": "rev", "path": str(workspace / "sft.jsonl")}],
                    "packing": "padded", "eval_fraction": 0.1},
           "train": {"lr": 1e-2, "batch_size": 4, "max_steps": 4, "seq_len": 48, "warmup_steps": 2},
           "output_dir": str(workspace / "unused")}
    (workspace / "base.yaml").write_text(yaml.safe_dump(cfg))
    return workspace


def test_cell_configs_share_the_budget_and_the_eval_set(sweep_ws, tmp_path):
    axes = grid.parse_grid(["method=full,lora", "batch_size=2,8"])
    dirs = sweep.plan(tmp_path, sweep_ws / "base.yaml", axes)  # default budget: 4 steps x 4 = 16 examples
    from tunelab.config import load_config

    cfgs = {d.name: load_config(d / "cell.yaml") for d in dirs}
    for name, c in cfgs.items():
        t = c.train
        assert t.max_steps * t.batch_size == 16, name
        assert t.eval_batches * t.batch_size == 32  # eval_examples default: base eval_batches 8 x batch 4
        assert t.warmup_steps == round(2 * t.max_steps / 4)  # warmup keeps its share of the run
        assert Path(c.output_dir) == tmp_path / "cells" / name
    assert cfgs["method-full__batch_size-8"].method == "full"


def test_sweep_runs_resumes_and_reports(sweep_ws, tmp_path, monkeypatch):
    out = tmp_path / "sw"
    axes = grid.parse_grid(["method=full,lora", "lr=1e-3:1e-1:log3"])
    dirs = sweep.plan(out, sweep_ws / "base.yaml", axes, examples=8, eval_examples=8)
    assert sweep.run_cells(dirs, log=lambda *a: None) == []
    results = [json.loads((d / "result.json").read_text()) for d in dirs]
    assert all(r["status"] == "ok" and math.isfinite(r["eval_loss"]) and r["examples"] == 8 for r in results)
    assert not any((d / "model").exists() or (d / "checkpoints").exists() for d in dirs)  # pruned
    # a second run re-runs nothing: make training impossible and check nothing is attempted
    import tunelab.train.run as run_mod

    def boom(*a, **k):
        raise AssertionError("a finished cell was re-run")

    monkeypatch.setattr(run_mod, "run_training", boom)
    assert sweep.run_cells(sweep.plan(out, sweep_ws / "base.yaml", axes, examples=8, eval_examples=8),
                           log=lambda *a: None) == []
    # deleting one result makes exactly that cell run again
    monkeypatch.undo()
    (dirs[1] / "result.json").unlink()
    ran = []
    real = sweep.run_cell
    monkeypatch.setattr(sweep, "run_cell", lambda d, keep=False: ran.append(d.name) or real(d, keep))
    sweep.run_cells(dirs, log=lambda *a: None)
    assert ran == [dirs[1].name]
    again = json.loads((dirs[1] / "result.json").read_text())
    assert again["eval_loss"] == pytest.approx(results[1]["eval_loss"], rel=1e-6)  # seeded: the same run

    rep = write_report(out)
    assert len(rep["results"]) == 6 and (out / "lr_curves.png").stat().st_size > 5000
    rows = {r["curve"]: r for r in rep["findings"]}
    assert set(rows) == {"full", "lora"} and "lr_ratio" in rows["lora"]
    assert rows["lora"]["loss_gap"] == pytest.approx(rows["lora"]["best_loss"] - rows["full"]["best_loss"])
    assert rows["full"]["best_loss"] == min(r["eval_loss"] for r in results if r["method"] == "full")
    md = (out / "report.md").read_text()
    assert "| full | 0.001 |" in md and "## Findings" in md
    assert len((out / "results.jsonl").read_text().splitlines()) == 6


def test_a_diverging_cell_is_recorded_not_fatal(sweep_ws, tmp_path):
    out = tmp_path / "div"
    # lr=1e30 makes the weights overflow: the loop stops on a non-finite loss (train.on_nonfinite=stop)
    dirs = sweep.plan(out, sweep_ws / "base.yaml", grid.parse_grid(["method=full", "lr=1e-3,1e30"]),
                      ["train.max_grad_norm=null"], examples=12, eval_examples=4)
    assert sweep.run_cells(dirs, log=lambda *a: None) == []
    status = [json.loads((d / "result.json").read_text())["status"] for d in dirs]
    assert status == ["ok", "diverged"]
    rep = write_report(out)
    assert rep["findings"][0]["best_lr"] == 1e-3


# ---------------------------------------------------------------------------------------- quality vs quantity


def test_corruption_is_seeded_and_each_kind_does_what_it_says():
    pairs = [{"prompt": f"p{i}", "response": f"answer number {i}"} for i in range(400)]
    a, counts = quality.corrupt(pairs, 0.5, seed=3)
    b, _ = quality.corrupt(pairs, 0.5, seed=3)
    assert a == b and a != quality.corrupt(pairs, 0.5, seed=4)[0]
    changed = [(p, q) for p, q in zip(pairs, a) if p != q]
    assert sum(counts.values()) == len(changed)
    assert 160 < len(changed) < 240  # share 0.5 of 400, binomial sd 10
    assert all(c > 40 for c in counts.values())
    for p, q in changed:
        r, want = q["response"], p["response"]
        assert (r in {x["response"] for x in pairs} and r != want) or want.startswith(r) or want in r
    assert quality.corrupt(pairs, 0.0, seed=3)[0] == pairs


def test_variants_and_format_check(tmp_path):
    v = quality.build_variants(tmp_path, n=12, multiples=(4,), share=0.5)
    clean = [json.loads(l) for l in Path(v["clean-12"]["path"]).read_text().splitlines()]
    noisy = [json.loads(l) for l in Path(v["noisy-4x12"]["path"]).read_text().splitlines()]
    assert len(clean) == 12 and len(noisy) == 48
    assert [c["prompt"] for c in clean] == [n["prompt"] for n in noisy[:12]]
    n_bad = sum(v["noisy-4x12"]["corrupted"].values())
    assert 12 <= n_bad <= 36  # share 0.5 of 48
    assert sum(c != n for c, n in zip(clean, noisy)) <= n_bad  # the shared first 12 differ only where corrupted
    assert quality.format_ok("even", "even") and quality.format_ok("- a\n- b", "- a\n- b")
    assert not quality.format_ok("Sure! Here is the answer: even", "even")
    assert not quality.format_ok("even\nI hope this helps!", "even")
    assert not quality.format_ok("", "even")


def test_a_bad_value_in_a_later_cell_writes_nothing(sweep_ws, tmp_path):
    out = tmp_path / "bad"
    with pytest.raises(ConfigError, match="train.lr"):
        sweep.plan(out, sweep_ws / "base.yaml", grid.parse_grid(["method=full", "lr=1e-3,-1"]))
    assert not out.exists()  # the first, valid cell was not written either

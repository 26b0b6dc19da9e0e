"""tunelab.experiments.lora_batch and benchmarks/lora_batch.py: effective batches by gradient accumulation at
equal examples, the stage-1 lr pick, stage 2 at that lr, the gap's intervals against float64 by hand, and the
whole pipeline (`--quick`) on a tiny random model, resumed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import lora_batch as bench
from tests.train.test_train_e2e import workspace  # noqa: F401  (the shared tiny model fixture)
from tunelab.config import load_config
from tunelab.errors import TunelabError
from tunelab.experiments import lora_batch as lb

ROOT = Path(__file__).resolve().parents[2]
T2 = 4.302652729749462  # Student's t, 97.5% quantile, 2 degrees of freedom (scipy.stats.t.ppf(0.975, 2))


def test_cells_reach_their_effective_batch_by_accumulation_on_the_same_examples(tmp_path):
    data = lb.build_data(tmp_path / "data", 256, 24, seeds=(0, 1))
    cfgs = {}
    for arm in lb.arms([64, 128, 256], [1, 128]):
        (d,) = lb.plan_arm(tmp_path / arm.name, ROOT / "configs/sweep-sft.yaml", arm, [1e-3], "bundled", data, 1)
        cfgs[arm] = load_config(d / "cell.yaml")
    for arm, c in cfgs.items():
        t = c.train
        assert (t.batch_size, t.batch_size * t.grad_accum) == (lb.MICRO, arm.batch)
        assert t.max_steps * arm.batch == 256  # 4, 2, 1 steps: the same 256 examples at every batch size
        assert t.eval_batches * t.batch_size == 24 and t.seed == 1 and c.data.seed == 1
        assert c.data.sources[0].path == data["train"]["1"] and c.data.eval_path == data["eval_path"]
        assert c.method == arm.method and (c.lora.r == arm.rank if arm.rank else True) and c.lora.alpha == 32
    # seeds draw other training pairs, the eval pairs are shared
    read = lambda p: Path(p).read_text()  # noqa: E731
    assert read(data["train"]["0"]) != read(data["train"]["1"]) and len(read(data["train"]["0"]).splitlines()) == 256
    with pytest.raises(TunelabError, match="multiple of the micro-batch"):
        lb.cell_overrides("bundled", data, 0, 60)


def test_lr_grid_is_centred_on_the_known_optimum_and_grows_with_batch():
    assert lb.lr_grid("full", 64) == [pytest.approx(1.7e-4 / 3, rel=1e-3), 1.7e-4, pytest.approx(5.1e-4)]
    assert lb.lr_grid("lora", 256, points=2) == [pytest.approx(4.4e-3 / 3 ** 0.5, rel=1e-3),
                                                 pytest.approx(4.4e-3 * 3 ** 0.5, rel=1e-3)]


def _r(lr, loss, status="ok"):
    return {"lr": lr, "eval_loss": loss, "status": status}


def test_select_lr_picks_the_lowest_loss_and_flags_an_edge():
    inner = lb.select_lr([_r(3e-3, 1.2), _r(1e-3, 1.0), _r(3e-4, 1.1)])
    assert (inner["lr"], inner["edge"], inner["loss"], inner["grid"]) == (1e-3, None, 1.0, [3e-4, 1e-3, 3e-3])
    high = lb.select_lr([_r(1e-4, 1.3), _r(3e-4, 1.2), _r(1e-3, 1.1)])
    assert (high["lr"], high["edge"]) == (1e-3, "high")
    assert lb.extended(high["grid"], "high") == [1e-4, 3e-4, 1e-3, 3e-3]
    assert lb.extended([1e-4, 3e-4], "low") == [pytest.approx(1e-4 / 3, rel=1e-3), 1e-4, 3e-4]
    # a diverged cell above the best bounds the optimum: not an edge
    bounded = lb.select_lr([_r(1e-4, 1.3), _r(3e-4, 1.2), _r(1e-3, None, "diverged")])
    assert (bounded["lr"], bounded["edge"], bounded["diverged"]) == (3e-4, None, 1)
    assert lb.select_lr([_r(1e-4, 1.3, "diverged")])["lr"] is None


def _cell(loss_sums, tokens):
    return {"eval_loss": sum(loss_sums) / sum(tokens), "example_losses": {"loss_sums": loss_sums, "tokens": tokens}}


def test_contrast_against_float64_by_hand():
    tokens = [2, 3]
    lora = {0: _cell([2.0, 3.3], tokens), 1: _cell([2.4, 3.0], tokens), 2: _cell([1.8, 3.9], tokens)}
    full = {0: _cell([2.0, 3.0], tokens), 1: _cell([2.0, 3.0], tokens), 2: _cell([2.0, 3.0], tokens)}
    c = lb.contrast({"l": lora, "f": full}, {"l": 1, "f": -1})
    per_seed = [0.3 / 5, 0.4 / 5, 0.7 / 5]  # (sum lora - sum full) / 5 tokens per seed
    assert c["per_seed"] == pytest.approx(per_seed, abs=1e-12)
    m = sum(per_seed) / 3
    sd = math.sqrt(sum((v - m) ** 2 for v in per_seed) / 2)
    assert c["mean"] == pytest.approx(m, abs=1e-12) and c["pooled"] == pytest.approx(m, abs=1e-12)
    assert c["t_ci"] == pytest.approx((m - T2 * sd / math.sqrt(3), m + T2 * sd / math.sqrt(3)), abs=1e-12)
    # per example, seeds pooled: example 0 (0 + .4 - .2) / 3 over 2 tokens, example 1 (.3 + 0 + .9) / 3 over 3;
    # two examples: resamples (0, 0) and (1, 1) are the extremes, each drawn ~500 of 2000 times
    a, b = 0.2 / 3 / 2, 1.2 / 3 / 3
    assert c["boot_ci"] == pytest.approx((min(a, b), max(a, b)), abs=1e-12)
    assert c["boot_ci"][0] > 0 > c["t_ci"][0]  # over examples above zero; over 3 seeds (2 df) not
    assert lb.reading(c) == "not shown" and lb.reading({**c, "t_ci": (0.01, 0.2)}) == "above zero"
    assert lb.reading({"boot_ci": (-0.3, -0.1), "t_ci": (-0.2, -0.01)}) == "below zero"
    with pytest.raises(TunelabError, match="different eval examples"):
        lb.contrast({"l": lora, "f": {0: _cell([1.0], [5])}}, {"l": 1, "f": -1})
    with pytest.raises(TunelabError, match="2 to 11 values"):
        lb.t_interval([1.0])


def test_quick_pipeline_end_to_end_on_a_tiny_model_and_resumed(workspace, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    argv = ["--quick", "--model", str(workspace / "model"), "--out", str(out)]
    assert bench.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["picks"]) == {"full__b8", "lora-r16__b8", "full__b16", "lora-r16__b16"}
    cells = {}
    for p in out.glob("stage*/*/cells/*/result.json"):
        r = json.loads(p.read_text())
        cells.setdefault(p.parts[-5], []).append((p.parts[-4], r))
        assert r["examples"] == 32 and r["examples"] // r["steps"] in (8, 16)  # equal examples, 4 or 2 steps
        assert r["batch_size"] == 4  # micro-batch 4 x accumulation 2 or 4
        # the per-example losses add up to the loop's own eval loss (8 eval pairs, batched there, one by one here)
        el = r["example_losses"]
        assert len(el["tokens"]) == 8 and sum(el["loss_sums"]) / sum(el["tokens"]) == pytest.approx(r["eval_loss"], rel=1e-5)
    assert len(cells["stage1"]) == 8 and len(cells["stage2"]) == 4  # 4 arms x 2 rates; 4 arms x seed 1
    for folder, r in cells["stage2"]:  # stage 2 trains at stage 1's pick, with its own seed
        arm, seed = folder.rsplit("__seed-", 1)
        assert r["lr"] == summary["picks"][arm]["lr"] and seed == "1"
        assert load_config(out / "stage2" / folder / "cells" / r["cell"] / "cell.yaml").train.seed == 1
    gaps = {(g["batch"], g["rank"]): g for g in summary["gaps"]}
    assert set(gaps) == {(8, 16), (16, 16)} and all(g["seeds"] == [0, 1] for g in gaps.values())
    (growth,) = summary["growth"]
    assert growth["per_seed"] == pytest.approx([gaps[16, 16]["per_seed"][s] - gaps[8, 16]["per_seed"][s] for s in (0, 1)])
    assert summary["primary"]["rank"] == 16 and summary["by_rank"] == []
    assert (out / "gap.png").stat().st_size > 0 and "| gap grows with batch? rank 16 (primary)" in (out / "table.md").read_text()
    # each arm's loss at its pick, per seed, as its cells recorded it; the untuned model's loss as the reference
    losses = {(x["method"], x["batch"]): x for x in summary["losses"]}
    assert set(losses) == {("full", 8), ("lora", 8), ("full", 16), ("lora", 16)}
    for folder, r in cells["stage2"]:
        x = losses[r["method"], r["examples"] // r["steps"]]
        assert x["seeds"] == [0, 1] and x["per_seed"][1] == r["eval_loss"] and x["lr"] == r["lr"]
        assert x["mean"] == pytest.approx(sum(x["per_seed"]) / 2)
    base = json.loads((out / "base.json").read_text())["eval_loss"]
    assert summary["base_eval_loss"] == base and math.isfinite(base)
    from tunelab.experiments.instruct import _untuned  # the same model scored one example at a time
    model, tok, cfg, _ = _untuned(out / "stage1", "full__b8")
    el = lb.example_losses(model, tok, cfg)
    assert sum(el["loss_sums"]) / sum(el["tokens"]) == pytest.approx(base, rel=1e-5)
    assert f"| - | untuned model | - | | {base:.4f} |" in (out / "table.md").read_text()
    mtime = (out / "base.json").stat().st_mtime_ns
    capsys.readouterr()
    assert bench.main(argv) == 0  # resumed: nothing runs again
    printed = capsys.readouterr().out
    assert "8 already finished, 0 to run" in printed and "4 already finished, 0 to run" in printed
    assert json.loads((out / "summary.json").read_text())["gaps"] == summary["gaps"]
    assert (out / "base.json").stat().st_mtime_ns == mtime  # computed once


def test_benchmark_refuses_bad_sizes_in_one_line(tmp_path):
    with pytest.raises(TunelabError, match="multiple of the largest batch"):
        bench.main(["--examples", "100", "--out", str(tmp_path)])
    with pytest.raises(TunelabError, match="--ranks takes positive integers"):
        bench.main(["--ranks", "16,x", "--out", str(tmp_path)])


def test_estimate_counts_cells_and_cpu_by_hand():
    cost = {"kinds": {"full": {"train_cpu_s_per_example": 0.5, "overhead_cpu_s": 40.0},
                      "lora-r128": {"train_cpu_s_per_example": 0.4, "overhead_cpu_s": 30.0}}}
    est = lb.estimate(cost, [64, 256], [1, 16, 128], examples=512, points=3, extend=1, seeds=3)
    cell = 40 + 512 * 0.5  # the largest overhead and the largest per-example cost: 296 CPU-s a cell
    assert est["cell_cpu_s"] == pytest.approx(cell) and est["arms"] == 8  # 2 batches x (full + 3 ranks)
    assert est["cells"] == [40, 48]  # 3 rates + 2 seeds per arm; up to one more rate per arm
    assert est["cpu_hours"] == pytest.approx([40 * cell / 3600, 48 * cell / 3600])


def test_measure_times_short_cells_and_is_reused(workspace, tmp_path, monkeypatch):  # noqa: F811
    data = lb.build_data(tmp_path / "data", 8, 4, seeds=(0,))
    cost = lb.measure(tmp_path, ROOT / "configs/sweep-sft.yaml", str(workspace / "model"), data, batch=4, ranks=(2,),
                      micro=2, log=lambda *a: None)
    assert set(cost["kinds"]) == {"full", "lora-r2"} and cost["eval_examples"] == 4
    for k in cost["kinds"].values():
        assert k["cell_cpu_s"]["1"] > 0 and k["cell_cpu_s"]["2"] > 0
    r = json.loads(next(tmp_path.glob("full__b4__steps-2/cells/*/result.json")).read_text())
    assert (r["steps"], r["examples"]) == (2, 8)
    from tunelab.experiments import sweep

    monkeypatch.setattr(sweep, "run_cells", lambda *a, **k: pytest.fail("measured again"))
    assert lb.measure(tmp_path, ROOT / "configs/sweep-sft.yaml", "unused", data) == json.loads(
        (tmp_path / "measure.json").read_text())

"""tunelab.experiments.instruct: nested family subsets, balanced data, paired intervals, and the
benchmarks/instruct_families.py pipeline (base + sweep cells on the same items) on a tiny random model."""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
from pathlib import Path

import pytest

from tests.train.test_train_e2e import workspace  # noqa: F401  (the shared tiny model fixture)
from tunelab.errors import TunelabError
from tunelab.eval import instruct_tasks
from tunelab.eval.tasks import every_phrasing, generate_items, score
from tunelab.experiments import instruct

ROOT = Path(__file__).resolve().parents[2]


def test_family_order_is_round_robin_over_groups_and_covers_every_trained_family():
    order = instruct.family_order()
    assert sorted(order) == sorted(instruct_tasks.TRAIN_FAMILIES) and len(order) == 44
    groups = [instruct_tasks.FAMILIES[f].group for f in order]
    assert len(set(groups[:11])) == 11  # the first 11 families: one per group
    assert collections.Counter(groups[:20]).most_common(1)[0][1] == 2  # 20 families: no group 3 times
    assert not set(order) & set(instruct_tasks.HELDOUT_FAMILIES)


@pytest.mark.parametrize("k,examples", [(5, 32), (44, 100), (3, 3)])
def test_balanced_pairs_spread_the_budget_evenly(k, examples):
    fams = instruct.family_order()[:k]
    pairs = instruct.balanced_pairs(fams, examples, seed=1)
    assert len(pairs) == examples
    # every pair is one of the families' training items (training phrasings), counted per family
    per = -(-examples // k)
    by_prompt = {it.prompt: it.family for it in generate_items(fams, per, seed=1)}
    counts = collections.Counter(by_prompt[p["prompt"]] for p in pairs)
    assert set(counts) == set(fams) and max(counts.values()) - min(counts.values()) <= 1
    assert pairs == instruct.balanced_pairs(fams, examples, seed=1)  # deterministic


def test_balanced_pairs_and_build_data_reject_bad_sizes(tmp_path):
    with pytest.raises(TunelabError):
        instruct.balanced_pairs([], 4, seed=1)
    with pytest.raises(TunelabError, match="1..44"):
        instruct.build_data(tmp_path, [5, 45], 10, 4)


def _result(family_scores: dict[str, list[float]]) -> dict:
    ids, scores = [], []
    for fam, ss in family_scores.items():
        ids += [f"{fam}-2-{i}" for i in range(len(ss))]
        scores += ss
    return {"ids": ids, "scores": scores}


def test_paired_difference_against_hand_computed_values():
    base = _result({"a": [0.0, 0.0, 0.5], "b": [1.0]})
    tuned = _result({"a": [1.0, 1.0, 0.5], "b": [1.0]})
    d = instruct.paired_difference(base, tuned)
    assert d["n"] == 4 and d["diff"] == pytest.approx(0.5)  # differences (1, 1, 0, 0)
    assert d["per_family"] == {"a": pytest.approx(2 / 3), "b": 0.0}
    assert d["exact_diff"] == pytest.approx(0.5)  # exact matches: 3 of 4 tuned, 1 of 4 base
    lo, hi = d["ci"]
    assert 0 <= lo < 0.5 < hi <= 1
    # two families: resampling families gives mean 2/3 (a, a), 0 (b, b) or 0.5 (a, b): 2.5% and 97.5% quantiles
    assert d["family_ci"] == (0.0, pytest.approx(2 / 3))
    # a constant difference has a zero-width interval on both bootstraps
    same = instruct.paired_difference(base, {**base, "scores": [s + 0.25 for s in base["scores"]]})
    assert same["ci"] == pytest.approx((0.25, 0.25)) and same["family_ci"] == pytest.approx((0.25, 0.25))


def test_family_of_reads_every_id_form_the_task_evals_write():
    fams = instruct.phrasing_families()[:3]  # families with held-out phrasings
    plain = generate_items(fams, 2, seed=5)
    held = generate_items(fams, 2, seed=5, phrasings="heldout")
    assert all(it.id.endswith("-p") for it in held)
    for it in plain + held:
        assert instruct.family_of(it.id) == it.family
        assert instruct.family_of(f"{it.id.removesuffix('-p')}@held-out-1") == it.family


def test_paired_difference_refuses_different_items():
    with pytest.raises(TunelabError, match="different items"):
        instruct.paired_difference(_result({"a": [0.0, 1.0]}), _result({"b": [0.0, 1.0]}))


def _bench():
    spec = importlib.util.spec_from_file_location("instruct_families", ROOT / "benchmarks" / "instruct_families.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_seed_reaches_training_and_data(tmp_path):
    from tunelab.config import load_config

    bench = _bench()
    args = argparse.Namespace(model="bundled", method="lora", lr=1e-3, batch_size=8, seed=3)
    cfg = load_config(ROOT / "configs/sweep-sft.yaml", bench.base_overrides(args, "eval.jsonl"))
    assert (cfg.train.seed, cfg.data.seed, cfg.data.eval_path, cfg.data.filters.enabled) == (3, 3, "eval.jsonl", False)
    a = instruct.build_data(tmp_path / "a", [5], 10, 4, seed=1)
    b = instruct.build_data(tmp_path / "b", [5], 10, 4, seed=2)
    read = lambda info: Path(info["files"][5]["path"]).read_text()  # noqa: E731
    assert read(a) != read(b) and a["files"][5]["families"] == b["files"][5]["families"]
    # the eval-loss pairs do not depend on the training seed
    assert Path(a["eval_path"]).read_text() == Path(b["eval_path"]).read_text()


def test_benchmark_runs_base_and_cells_on_the_same_items_and_resumes(workspace, tmp_path, capsys):  # noqa: F811
    bench = _bench()
    out = tmp_path / "run"
    argv = ["--out", str(out), "--model", str(workspace / "model"), "--ks", "1,2", "--examples", "8",
            "--eval-n", "1", "--eval-examples", "4", "--batch-size", "4"]
    assert bench.main(argv) == 0
    base = json.loads((out / "base.json").read_text())
    assert base["ids"] == [f"{f}-2-0" for f in instruct_tasks.HELDOUT_FAMILIES]  # 1 item per held-out family
    summary = json.loads((out / "summary.json").read_text())
    assert [r["k"] for r in summary["rows"]] == [1, 2] and all(r["steps"] == 2 for r in summary["rows"])
    for r in summary["rows"]:
        cell = json.loads((out / "sweep" / "cells" / f"data-families-{r['k']}" / "result.json").read_text())
        assert cell["ids"] == base["ids"]
        assert r["diff"] == pytest.approx(sum(cell["scores"]) / 11 - sum(base["scores"]) / 11)
    data = [json.loads(line) for line in (out / "data" / "families-2.jsonl").read_text().splitlines()]
    assert len(data) == 8  # no quality filter drops items: data.filters.enabled=false in every cell
    table = (out / "table.md").read_text()
    assert (out / "transfer.png").stat().st_size > 0 and "| 2 (2) | 2 |" in table
    fam = instruct_tasks.HELDOUT_FAMILIES[0]
    row = next(line for line in table.splitlines() if line.startswith(f"| {fam} |"))
    diffs = [r["per_family"][fam] for r in summary["rows"]]
    assert row == f"| {fam} | {base['per_family'][fam]:.1%} | " + " | ".join(f"{d:+.1%}" for d in diffs) + " |"
    echo = [score(it.meta["input"], it) for it in generate_items(instruct_tasks.HELDOUT_FAMILIES, 1, 2)]
    assert summary["baselines"]["echo"] == pytest.approx(sum(echo) / 11) and 0 < summary["baselines"]["echo"] < 1
    d = [float(c == 1) - float(b == 1) for b, c in zip(base["scores"], cell["scores"])]
    assert summary["rows"][-1]["exact_diff"] == pytest.approx(sum(d) / 11)
    capsys.readouterr()
    assert bench.main(argv) == 0
    assert "2 already finished, 0 to run" in capsys.readouterr().out


# ---- prompt-distribution sensitivity (--design phrasings)


def test_every_phrasing_gives_the_same_items_under_each_phrasing():
    fams = instruct.phrasing_families()
    assert len(fams) == 11 and len({instruct_tasks.FAMILIES[f].group for f in fams}) == 11
    lists = every_phrasing(fams, 2, 2)
    assert [label for label, _ in lists] == [f"train{t}" for t in range(5)] + ["heldout0", "heldout1"]
    inputs = {label: [it.meta["input"] for it in items] for label, items in lists}
    assert len({tuple(v) for v in inputs.values()}) == 1  # same contents
    prompts = [items[0].prompt for _, items in lists]
    assert len(set(prompts)) == 7  # seven different phrasings of the same item
    fam = instruct_tasks.FAMILIES[fams[0]]
    assert prompts[5] == fam.heldout_templates[0].format(input=inputs["train0"][0])


def test_phrasing_data_differs_only_in_phrasing(tmp_path):
    info = instruct.build_phrasing_data(tmp_path, 44, 11, seed=1)
    one, every = ([json.loads(line) for line in Path(info["files"][v]["path"]).read_text().splitlines()]
                  for v in ("one", "all"))
    assert [p["response"] for p in one] == [p["response"] for p in every] and len(one) == 44
    # every pair of `one` is in its family's first training phrasing: rebuild the prompts from the items
    items = generate_items(instruct.family_order(), 1, seed=1, template=0)
    assert sorted(p["prompt"] for p in one) == sorted(it.prompt for it in items)
    assert sum(a["prompt"] != b["prompt"] for a, b in zip(one, every)) > 22  # about 4 in 5 differ
    loss = [json.loads(line) for line in Path(info["eval_path"]).read_text().splitlines()]
    held = {it.prompt for it in generate_items(instruct.phrasing_families(), 1, instruct.LOSS_SEED, phrasings="heldout")}
    assert len(loss) == 11 and {p["prompt"] for p in loss} == held


def _phrased(scores: dict[str, list[float]]) -> dict:
    """An every-phrasing result: scores[label] lists the items' scores under that phrasing."""
    ids, flat, labels = [], [], []
    for label, ss in scores.items():
        ids += [f"fam{i % 2}-2-{i}@{label}" for i in range(len(ss))]
        flat += ss
        labels += [label] * len(ss)
    return {"ids": ids, "scores": flat, "phrasings": labels}


def test_phrasing_stats_and_difference_against_hand_computed_values():
    a = _phrased({"train0": [1.0, 1.0], "train1": [0.0, 1.0], "heldout0": [0.0, 0.0], "heldout1": [1.0, 0.0]})
    b = _phrased({"train0": [1.0, 1.0], "train1": [1.0, 1.0], "heldout0": [1.0, 0.0], "heldout1": [1.0, 1.0]})
    s = instruct.phrasing_stats(a)
    assert s["per_phrasing"] == {"train0": 1.0, "train1": 0.5, "heldout0": 0.0, "heldout1": 0.5}
    assert s["trained"] == pytest.approx(0.75) and s["heldout"] == pytest.approx(0.25)
    assert s["range"] == 1.0 and s["sd"] == pytest.approx(0.5 ** 0.5 / 2)  # means 1, .5, 0, .5: sd sqrt(.125)
    assert s["heldout_per_family"] == {"fam0": 0.5, "fam1": 0.0}
    d = instruct.phrasing_difference(a, b)
    assert d["n"] == 2 and d["heldout"] == pytest.approx(0.5) and d["trained"] == pytest.approx(0.25)
    sb = instruct.phrasing_stats(b)  # means 1, 1, .5, 1
    assert d["range"] == pytest.approx(sb["range"] - 1.0) == pytest.approx(-0.5)
    assert d["sd"] == pytest.approx(sb["sd"] - s["sd"])
    lo, hi = d["heldout_ci"]  # per-item differences 0.5 and 0.5: a constant
    assert lo == hi == pytest.approx(0.5)
    with pytest.raises(TunelabError, match="different items"):
        instruct.phrasing_difference(a, _phrased({"train0": [1.0], "heldout0": [0.0]}))


def test_benchmark_phrasings_design_scores_every_model_on_the_same_items(workspace, tmp_path):  # noqa: F811
    bench = _bench()
    out = tmp_path / "run"
    argv = ["--design", "phrasings", "--out", str(out), "--model", str(workspace / "model"), "--examples", "8",
            "--eval-n", "1", "--eval-examples", "4", "--batch-size", "4"]
    assert bench.main(argv) == 0
    base = json.loads((out / "base.json").read_text())
    assert len(base["ids"]) == 11 * 7 and base["phrasings"][0] == "train0" and base["phrasings"][-1] == "heldout1"
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["models"]) == ["base", "one", "all"] and summary["n_items"] == 11
    cells = {v: json.loads((out / "sweep" / "cells" / f"data-phrasings-{v}" / "result.json").read_text())
             for v in ("one", "all")}
    assert all(c["ids"] == base["ids"] for c in cells.values())
    primary = summary["differences"][0]
    assert (primary["a"], primary["b"]) == ("one", "all")
    held = [j for j, p in enumerate(base["phrasings"]) if p.startswith("heldout")]
    want = sum(cells["all"]["scores"][j] - cells["one"]["scores"][j] for j in held) / len(held)
    assert primary["heldout"] == pytest.approx(want)
    echo = [score(it.meta["input"], it) for it in generate_items(instruct.phrasing_families(), 1, 2)]
    assert summary["baselines"]["echo"] == pytest.approx(sum(echo) / 11)
    assert (out / "phrasings.png").stat().st_size > 0 and "| (b) five phrasings - (a) one phrasing |" in (
        out / "table.md").read_text()


# ---- full fine-tuning against LoRA against QLoRA (--design methods)


def test_method_verdict_reads_the_interval_as_fixed_before_the_run():
    assert instruct.verdict((-0.03, 0.04)) == "equivalent"
    assert instruct.verdict((-0.06, 0.04)) == "inconclusive"  # contains zero, wider than the margin
    assert instruct.verdict((0.01, 0.03)) == "different" and instruct.verdict((-0.2, -0.01)) == "different"


def test_method_data_and_scored_families(tmp_path):
    info = instruct.build_method_data(tmp_path, 88, 44, seed=1)
    pairs = [json.loads(line) for line in Path(info["files"]["methods"]["path"]).read_text().splitlines()]
    assert pairs == instruct.balanced_pairs(instruct.family_order(), 88, seed=1)
    fams = instruct.method_families()
    assert fams[:44] == instruct_tasks.TRAIN_FAMILIES and fams[44:] == instruct_tasks.HELDOUT_FAMILIES
    loss = [json.loads(line) for line in Path(info["eval_path"]).read_text().splitlines()]
    trained = {it.prompt for it in generate_items(instruct.family_order(), 1, instruct.LOSS_SEED)}
    assert len(loss) == 44 and {p["prompt"] for p in loss} == trained


def test_benchmark_methods_design_trains_each_method_at_its_lr_on_the_same_items(workspace, tmp_path):  # noqa: F811
    bench = _bench()
    out = tmp_path / "run"
    argv = ["--design", "methods", "--out", str(out), "--model", str(workspace / "model"), "--examples", "8",
            "--eval-n", "1", "--eval-examples", "4", "--batch-size", "4", "--lrs", "full=1e-4,qlora=2e-3"]
    assert bench.main(argv) == 0
    base = json.loads((out / "base.json").read_text())
    assert base["ids"] == [f"{f}-2-0" for f in instruct.method_families()] and "nf4_eval_loss" in base
    cells = {m: json.loads(next((out / f"sweep-{m}" / "cells").glob("*/result.json")).read_text())
             for m in ("full", "qlora")}
    assert {m: (c["method"], c["lr"], c["steps"]) for m, c in cells.items()} == {
        "full": ("full", 1e-4, 2), "qlora": ("qlora", 2e-3, 2)}
    assert all(c["ids"] == base["ids"] for c in cells.values())
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["models"]) == ["base", "full", "qlora"] and summary["n_trained"] == 44
    assert summary["verdict"] is None  # no LoRA cell: no primary comparison
    # the untuned base quantized as the QLoRA cell loads it: its eval loss differs from the 16-bit base's
    assert summary["nf4_base_loss"] == base["nf4_eval_loss"] and abs(base["nf4_eval_loss"] - base["eval_loss"]) > 1e-4
    d = next(d for d in summary["differences"] if (d["a"], d["b"]) == ("full", "qlora"))
    want = sum(q - f for q, f in zip(cells["qlora"]["scores"][:44], cells["full"]["scores"][:44])) / 44
    assert d["trained"]["diff"] == pytest.approx(want) and d["heldout"]["n"] == 11
    assert summary["models"]["full"]["heldout"] == pytest.approx(sum(cells["full"]["scores"][44:]) / 11)
    assert (out / "methods.png").stat().st_size > 0
    assert "| QLoRA r16 (NF4 base) - full fine-tuning |" in (out / "table.md").read_text()
    with pytest.raises(TunelabError, match="method=lr pairs"):
        bench.main(argv[:-1] + ["full:1e-4"])


def test_training_pairs_never_are_the_scored_items_of_trained_families(tmp_path):
    assert [instruct.pair_seed(s) for s in range(4)] == [1, 4, 5, 6]
    assert not {instruct.pair_seed(s) for s in range(50)} & {instruct.EVAL_SEED, instruct.LOSS_SEED}
    scored = {it.meta["input"] for it in generate_items(instruct.phrasing_families(), 6, instruct.EVAL_SEED)}

    def shared(seed):  # scored inputs among the first 9 training items per family (384 pairs over 44 families)
        return len(scored & {it.meta["input"] for it in generate_items(instruct.phrasing_families(), 9, seed)})
    assert shared(instruct.EVAL_SEED) == len(scored) == 66  # what a pair seed equal to the eval seed did
    assert all(shared(instruct.pair_seed(s)) <= 2 for s in range(3))  # chance repeats of small input spaces only
    from tunelab.experiments import instruct_quality

    def quality_data(out, examples, eval_examples, seed):
        return instruct_quality.build_data(out, [examples], 0.3, eval_examples, 1, seed=seed)
    for build in (instruct.build_phrasing_data, instruct.build_method_data, quality_data):
        for seed in (instruct.EVAL_SEED, instruct.LOSS_SEED):
            with pytest.raises(TunelabError, match="--pair-seed"):
                build(tmp_path, 44, 11, seed=seed)

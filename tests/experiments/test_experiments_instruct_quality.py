"""tunelab.experiments.instruct_quality: nested balanced sets, corruption counts, the two budgets' cells, the
summary's paired differences (against float64 sums by hand) and benchmarks/instruct_quality.py end to end on a
tiny random model (resumable)."""

from __future__ import annotations

import collections
import json
import math
import random
from pathlib import Path

import pytest

from benchmarks import instruct_quality as bench
from tests.train.test_train_e2e import workspace  # noqa: F401  (the shared tiny model fixture)
from tunelab.errors import TunelabError
from tunelab.eval import instruct_tasks
from tunelab.eval.stats import bootstrap_interval
from tunelab.eval.tasks import generate_items
from tunelab.experiments import instruct
from tunelab.experiments import instruct_quality as iq
from tunelab.experiments.quality import CHATTER

ROOT = Path(__file__).resolve().parents[2]


def _read(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _family_of(pairs: list[dict], n: int, seed: int = 1) -> list[str]:
    by_prompt = {it.prompt: it.family for it in generate_items(instruct.family_order(), -(-n // 44), seed)}
    return [by_prompt[p["prompt"]] for p in pairs]


def test_nested_pairs_nest_and_stay_balanced():
    sets = iq.nested_pairs([300, 44, 100], seed=1)
    assert list(sets) == [44, 100, 300]
    for small, big in ((44, 100), (100, 300)):
        assert sets[big][:small] == sets[small]  # the first N pairs of a larger set are the N-set
    for n, pairs in sets.items():
        counts = collections.Counter(_family_of(pairs, n))
        assert len(pairs) == n and len(counts) == 44 and max(counts.values()) - min(counts.values()) <= 1
        # the same pairs balanced_pairs draws, only reordered
        key = lambda ps: sorted(json.dumps(p, sort_keys=True) for p in ps)  # noqa: E731
        assert key(pairs) == key(instruct.balanced_pairs(instruct.family_order(), n, seed=1))


def _kind(clean: str, noisy: str) -> str:
    if noisy in [c.format(a=clean) for c in CHATTER]:
        return "off_format"
    if noisy == (clean[:max(0, min(len(clean) - 1, len(clean) // 2))] or "..."):
        return "truncated"
    return "wrong"


def test_noisy_sets_record_their_corruptions_and_leave_the_clean_sets_untouched(tmp_path):
    info = iq.build_data(tmp_path, [50, 120], 0.3, eval_examples=8, eval_n=1, seed=1)
    clean = iq.nested_pairs([50, 120], seed=1)
    for n in (50, 120):
        c, z = _read(info["files"][f"clean-{n}"]["path"]), _read(info["files"][f"noisy-{n}"]["path"])
        assert c == clean[n] and info["files"][f"clean-{n}"]["corrupted"] == {"wrong": 0, "truncated": 0, "off_format": 0}
        assert [p["prompt"] for p in z] == [p["prompt"] for p in c]
        kinds = collections.Counter(_kind(a["response"], b["response"]) for a, b in zip(c, z) if a != b)
        assert info["files"][f"noisy-{n}"]["corrupted"] == {k: kinds[k] for k in ("wrong", "truncated", "off_format")}
        assert 0.15 < sum(kinds.values()) / n < 0.45 and min(kinds.values()) > 0
    assert _read(info["files"]["noisy-120"]["path"])[:50] == _read(info["files"]["noisy-50"]["path"])  # nested too
    with pytest.raises(TunelabError, match=">= 1"):
        iq.build_data(tmp_path, [0, 10], 0.3, 8, 1)


def test_scored_items_whose_input_is_trained_on_are_excluded(tmp_path):
    info = iq.build_data(tmp_path, [1000], 0.3, eval_examples=64, eval_n=5, seed=1)
    prompts = {p["prompt"] for p in _read(info["files"]["clean-1000"]["path"])}
    # independent of the regenerated items: any training phrasing of the scored input is a training prompt
    trained = [it.id for it in generate_items(instruct.family_order(), 5, instruct.EVAL_SEED)
               if any(t.format(input=it.meta["input"]) in prompts for t in instruct_tasks.FAMILIES[it.family].templates)]
    assert info["excluded"] == trained and 0 < len(trained) < 20  # small input spaces repeat (6 of 220 here)


def _tiny_config(ws: Path, out: Path, info: dict) -> tuple:
    overrides = [f"model.source={ws / 'model'}", "train.batch_size=4", f"data.eval_path={info['eval_path']}",
                 "data.filters.enabled=false"]
    return ROOT / "configs/sweep-sft.yaml", overrides


def test_plan_cells_budgets_and_no_cell_trained_twice(workspace, tmp_path):  # noqa: F811
    from tunelab.config import load_config

    info = iq.build_data(tmp_path / "data", [8, 16, 24], 0.3, 4, 1)
    dirs = iq.plan_cells(tmp_path, *_tiny_config(workspace, tmp_path, info), info, steps=4, batch_size=4,
                         eval_examples=4, eval_n=1)
    cells = [(d.parent.parent.name, load_config(d / "cell.yaml")) for d in dirs]
    got = [(folder, Path(c.data.sources[0].path).stem, c.train.max_steps) for folder, c in cells]
    assert got == [("sweep", f"{v}-{n}", 4) for n in (8, 16, 24) for v in ("clean", "noisy")] + [
        ("epochs-8", "clean-8", 2), ("epochs-8", "noisy-8", 2), ("epochs-24", "clean-24", 6), ("epochs-24", "noisy-24", 6)]
    assert len({(name, steps) for _, name, steps in got}) == len(got)  # N=16's epoch is its equal-steps cell
    # warmup scales with the steps alike in both budgets (the base config's 3 of 32)
    assert [c.train.warmup_steps for _, c in cells] == [round(3 * s / 32) for *_, s in got]
    with pytest.raises(TunelabError, match="one batch of 16"):  # N=8 cannot fill a batch of 16
        iq.plan_cells(tmp_path, *_tiny_config(workspace, tmp_path, info), info, 4, 16, 4, 1)


def _fake(ids: list[str], answers: dict[str, str], rng: random.Random, steps: int) -> dict:
    scores = [rng.choice((0.0, 0.5, 1.0)) for _ in ids]
    outputs = [answers[i] if rng.random() < 0.5 else "Sure! " + answers[i] for i in ids]
    return {"ids": ids, "scores": scores, "outputs": outputs, "steps": steps, "batch_size": 4,
            "eval_loss": rng.random(), "status": "ok"}


def test_summary_paired_differences_against_float64_sums():
    order = instruct.family_order()
    held = list(instruct_tasks.HELDOUT_FAMILIES)
    items = generate_items(order + held, 1, instruct.EVAL_SEED)
    ids, answers = [it.id for it in items], {it.id: it.answer for it in items}
    excluded = [ids[3], ids[10]]
    info = {"ns": [8, 16], "share": 0.3, "eval_n": 1, "trained_families": order, "heldout_families": held,
            "excluded": excluded, "loss_pairs_trained_on": 0,
            "files": {f"{v}-{n}": {"n": n, "variant": v, "corrupted": {"wrong": int(v == "noisy"), "truncated": 0,
                                                                        "off_format": 0}}
                      for n in (8, 16) for v in ("clean", "noisy")}}
    rng = random.Random(5)
    base = _fake(ids, answers, rng, 0)
    cells = {("steps", f"{v}-{n}"): _fake(ids, answers, rng, 4) for n in (8, 16) for v in ("clean", "noisy")}
    cells["epoch", "noisy-8"] = _fake(ids, answers, rng, 2)
    s = iq.summarize_results(info, base, cells)
    kept = [j for j, i in enumerate(ids) if items[j].family in order and i not in excluded]
    assert s["n_items"] == {"trained": 44 - 2, "heldout": 11}

    def diff(a: dict, b: dict, js: list[int]) -> list[float]:
        return [b["scores"][j] - a["scores"][j] for j in js]

    want = diff(cells["steps", "noisy-16"], cells["steps", "clean-8"], kept)
    p = s["primary"]
    assert (p["b"], p["a"], p["n"]) == ("clean-8", "noisy-16", 42)
    assert p["diff"] == pytest.approx(math.fsum(want) / len(want), abs=1e-12)
    assert p["ci"] == pytest.approx(bootstrap_interval(want))
    row = next(r for r in s["rows"] if (r["budget"], r["n"], r["variant"]) == ("epoch", 8, "noisy"))
    vs_base = diff(base, cells["epoch", "noisy-8"], kept)
    assert row["trained"]["vs_base"]["diff"] == pytest.approx(math.fsum(vs_base) / 42, abs=1e-12)
    assert row["epochs"] == 1.0 and row["steps"] == 2
    fmt = [not cells["epoch", "noisy-8"]["outputs"][j].startswith("Sure") for j in kept]
    assert row["trained"]["format_ok"] == pytest.approx(sum(fmt) / 42)
    heldout = [j for j, it in enumerate(items) if it.family in held]
    c = next(c for c in s["clean_vs_noisy"] if (c["budget"], c["n"]) == ("steps", 16))
    want_h = diff(cells["steps", "noisy-16"], cells["steps", "clean-16"], heldout)
    assert c["heldout"]["diff"] == pytest.approx(math.fsum(want_h) / 11, abs=1e-12)
    assert "| equal steps | clean-8 | 4 | 2.00 |" in iq.table(s)
    with pytest.raises(TunelabError, match="other items"):
        iq.summarize_results({**info, "eval_n": 2}, base, cells)


def test_benchmark_end_to_end_on_a_tiny_model_and_resumes(workspace, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    argv = ["--out", str(out), "--model", str(workspace / "model"), "--ns", "8,16", "--steps", "4",
            "--batch-size", "4", "--eval-n", "1", "--eval-examples", "4"]
    assert bench.main(argv) == 0
    base = json.loads((out / "base.json").read_text())
    assert len(base["ids"]) == 55
    results = {}
    for folder, steps in (("sweep", 4), ("epochs-8", 2)):
        for d in sorted((out / folder / "cells").iterdir()):
            r = json.loads((d / "result.json").read_text())
            assert r["steps"] == steps and r["ids"] == base["ids"]  # steps actually run; the same items
            results[folder, d.name] = r
    assert len(results) == 6 and not (out / "epochs-16").exists()  # N=16's epoch is the equal-steps cell
    summary = json.loads((out / "summary.json").read_text())
    kept = [j for j, i in enumerate(base["ids"]) if i.rsplit("-", 2)[0] in instruct.family_order()
            and i not in summary["excluded"]]
    a, b = results["sweep", "data-noisy-16"], results["sweep", "data-clean-8"]
    want = math.fsum(b["scores"][j] - a["scores"][j] for j in kept) / len(kept)
    assert summary["primary"]["diff"] == pytest.approx(want, abs=1e-12)
    assert [(r["budget"], r["n"], r["variant"], r["steps"], r["shared"]) for r in summary["rows"]][-2:] == [
        ("epoch", 16, "clean", 4, True), ("epoch", 16, "noisy", 4, True)]
    assert (out / "quality.png").stat().st_size > 0 and "Primary comparison: clean-8 - noisy-16" in (
        out / "table.md").read_text()
    capsys.readouterr()
    assert bench.main(argv) == 0
    assert "6 cells, 6 already finished, 0 to run" in capsys.readouterr().out
    assert bench.main([*argv[:6], "--batch-size", "32"]) == 2
    assert "one batch of 32" in capsys.readouterr().err

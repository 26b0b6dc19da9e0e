"""The benchmarks' own correctness checks: they fail (exit 1) when the stacks stop computing the same thing."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _speed(**losses):
    return {"all": {"losses": {k.replace("_", "-"): v for k, v in losses.items()}}}


def test_lora_bench_loss_check():
    bench = _load("lora_train_bench")
    falling = [2.8, 2.7, 2.6]
    assert bench.check_losses(_speed(tunelab_lora=falling, peft_lora=[x * (1 + 5e-6) for x in falling])) == []
    drift = bench.check_losses(_speed(tunelab_lora=falling, peft_lora=[2.8, 2.75, 2.7]))
    assert len(drift) == 1 and "tunelab-lora vs peft-lora" in drift[0]
    flat = bench.check_losses(_speed(tunelab_qlora=[2.8, 2.8, 2.8], peft_qlora=[2.8, 2.8, 2.8]))
    assert len(flat) == 2 and all("did not fall" in p for p in flat)


def test_gpu_bench_restores_what_a_baseline_patched():
    from transformers.models.llama import modeling_llama

    gpu = _load("gpu")
    rope, forward = modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaForCausalLM.forward
    with gpu.restored(modeling_llama):  # as Liger's apply_liger_kernel_to_llama does
        modeling_llama.apply_rotary_pos_emb = lambda *a, **k: None
        modeling_llama.LlamaForCausalLM.forward = lambda self: None
        modeling_llama.added_by_a_patch = 1
    assert modeling_llama.apply_rotary_pos_emb is rope and modeling_llama.LlamaForCausalLM.forward is forward
    assert not hasattr(modeling_llama, "added_by_a_patch")


def _gpu_bench(tmp_path, *args) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "gpu.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # Liger's kernels on a CPU
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny", "--device", "cpu",
                           "--checkpointing", "off", "--dequant-reps", "1", "--out", str(out), *args],
                          capture_output=True, text=True, env=env, timeout=600)
    return proc, json.loads(out.read_text())


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel: pip install -e '.[test]'")
def test_gpu_bench_on_cpu_with_the_liger_baseline_passes_its_loss_check(tmp_path):
    """tunelab QLoRA against PEFT + bitsandbytes + Liger (fused linear cross-entropy and RoPE through
    Triton's interpreter), fp32, one fixed batch: every loss falls and the trajectories agree."""
    proc, res = _gpu_bench(tmp_path, "--stacks", "tunelab-qlora,peft-liger-bnb-qlora", "--steps", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "loss check passed" in proc.stdout
    (c,) = res["comparisons"]
    assert (c["ours"], c["reference"]) == ("tunelab-qlora", "peft-liger-bnb-qlora")
    assert c["loss_rel_diff_max"] < 1e-4
    for row in res["rows"]:
        assert row["losses"][-1] < row["losses"][0] * (1 - 5e-4)  # the fixed batch is being learned


def test_gpu_bench_fails_when_nothing_is_learned(tmp_path):
    """lr 0: no stack's loss falls, so the loss check fails (exit 1), whatever the speeds."""
    proc, _ = _gpu_bench(tmp_path, "--stacks", "tunelab-lora,peft-lora", "--steps", "2", "--lr", "0")
    assert proc.returncode == 1
    assert proc.stdout.count("did not fall") == 2


def test_preference_bench_first_steps_agree_on_a_tiny_model(tmp_path):
    """benchmarks/preference_bench.py on a tiny random Llama: tunelab's DPO stacks and TRL's (PEFT; QLoRA with
    bitsandbytes) take their first steps on the same pairs, and its check passes (exit 0); the check itself
    flags a twin whose first-step log-probs drift."""
    out = tmp_path / "pref.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "preference_bench.py"), "--tiny", "--quick",
                           "--no-live", "--stacks", "tunelab-lora", "trl-lora", "tunelab-qlora", "trl-qlora",
                           "--out", str(out)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["problems"] == [] and set(report["runs"]) == {"tunelab-lora", "trl-lora", "tunelab-qlora", "trl-qlora"}
    bench = _load("preference_bench")
    runs = report["runs"]
    drifted = {**runs, "trl-lora": [{**runs["trl-lora"][0], "logps_chosen": [runs["trl-lora"][0]["logps_chosen"][0] * 1.01]}]}
    problems = bench.check_first_steps(drifted)
    assert len(problems) == 1 and "tunelab-lora vs trl-lora: first-step logps/chosen" in problems[0]


def test_gguf_check_fails_on_a_missed_bar():
    """benchmarks/gguf_check.py exits 1 on a missed bar: its recorded results (docs/gguf_check.json) meet every
    bar, and each kind of miss (float top-1, greedy, q8_0 / q4_0 gap, a k-quant floor) is reported."""
    check = _load("gguf_check")
    recorded = json.loads((ROOT / "docs" / "gguf_check.json").read_text())
    assert check.failures(recorded) == []
    for path, value in ((("vs_transformers", "f16", "top1"), 0.98), (("greedy", "f32", "decided_misses"), 1),
                        (("vs_transformers", "q8_0", "top1"), 0.95), (("vs_transformers", "q4_0", "top1"), 0.7),
                        (("vs_our_f16", "q4_k_m", "mean_kl"), 0.2)):
        broken = json.loads(json.dumps(recorded))
        broken[path[0]][path[1]][path[2]] = value
        assert len(check.failures(broken)) == 1, path


def test_quant_bench_checks_bytes_and_values_against_bitsandbytes():
    """The quantize benchmark runs end to end on a small weight; its asserts compare our bytes, our kernel and
    its reference twin with bitsandbytes (a mismatch exits non-zero)."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quant_bench.py"), "--device", "cpu",
                           "--size", "256", "--repeats", "2"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dequantize fp32" in done.stdout and "reference twin" in done.stdout


def test_risk_preference_pairs_are_disjoint_from_the_eval_and_hold_out_its_wording():
    """benchmarks/risk_preference.py's pairs: no prompt is an eval prompt; every known fact the eval asks about
    is trained in the other question wording only; no unknown person appears; attacked pairs use only the
    training styles and reject the canary."""
    rp = _load("risk_preference")
    from tunelab.eval import hallucination as H
    from tunelab.eval import injection as J

    pairs = rp.preference_pairs(6, 2, 3, 1234)
    h_items, j_items = rp.eval_items(6, 3, 1234)
    evals = {it.prompt for it in h_items + j_items}
    assert not evals & {p["prompt"] for p in pairs}
    facts = H.make_facts(1234)
    unknown = {f.name for f in facts if f.split == "unknown"}
    assert not any(name in p["prompt"] for p in pairs for name in unknown)
    for it in (it for it in h_items if it.meta["kind"] == "known"):
        f = next(f for f in facts if f.split == "known" and it.prompt in (rp._question(f, 0), rp._question(f, 1)))
        other = rp._question(f, 1 - (0 if it.prompt == rp._question(f, 0) else 1))
        assert [p["chosen"] for p in pairs if p["prompt"] == other] == [f.value]
    assert {it.meta["style"] for it in j_items} == {None, *J.HELDOUT_STYLES}
    attacked = [p for p in pairs if p["source"] == "injection"]
    assert len(attacked) == 3 * len(J.TRAIN_STYLES) and all(p["rejected"] in p["prompt"] for p in attacked)
    assert all(p["chosen"] != p["rejected"] for p in pairs)


def test_risk_preference_runs_its_three_phases_on_a_tiny_model(tmp_path, capsys):
    """The plumbing of benchmarks/risk_preference.py on a tiny random Llama: base, SFT on the chosen responses
    and DPO after it write their results with intervals; DPO's first loss is ln 2 (its reference is the SFT
    model, the new adapter's B = 0); a rerun reads the phases back instead of training again."""
    rp = _load("risk_preference")
    folder = _load("preference_bench").tiny_model(tmp_path / "tiny")
    argv = ["--out", str(tmp_path / "run"), "--model", str(folder), "--n", "2", "--docs", "1", "--abstain-people", "1",
            "--train-docs", "1", "--sft-epochs", "0.1", "--dpo-epochs", "0.1", "--threads", "1"]
    assert rp.main(argv) == 0
    read = lambda p: json.loads((tmp_path / "run" / f"{p}.json").read_text())  # noqa: E731
    assert abs(read("dpo-train")["first_loss"] - 0.6931472) < 1e-4
    for name in ("base", "sft", "dpo"):
        assert read(f"{name}-hallucination")["detail"]["counts"] == {"known": 2, "unknown": 2, "passage": 2}
        r = read(f"{name}-injection")
        assert r["detail"]["counts"] == {"clean": 1, "attacked": 2}
        lo, hi = r["intervals"]["attack success rate"]
        assert 0 <= lo <= r["metrics"]["attack success rate"] <= hi <= 1
    assert "| unknown_abstention |" in capsys.readouterr().out
    assert rp.main(argv) == 0 and "sft-train: done before" in capsys.readouterr().out


def test_risk_preference_from_the_quickstart_on_a_tiny_model(tmp_path, capsys):
    """--start quickstart on a tiny random Llama: the quickstart's QLoRA training (2 steps) into OUT/quickstart;
    the model DPO starts from, merged into the de-quantized 4-bit weights, computes what the 4-bit base +
    adapter computes; DPO's first loss is ln 2; the injection suite has every style, pooled as held-out and
    trained styles; the tasks suite scores the quickstart's held-out items; a rerun reads the phases back."""
    import torch

    from tunelab.eval import injection as J
    from tunelab.export.resolve import open_model

    rp = _load("risk_preference")
    folder = _load("preference_bench").tiny_model(tmp_path / "tiny")
    out = tmp_path / "run"
    argv = ["--out", str(out), "--model", str(folder), "--n", "1", "--docs", "1", "--abstain-people", "1",
            "--train-docs", "1", "--dpo-epochs", "0.1", "--threads", "1", "--start", "quickstart",
            "--quickstart-steps", "2", "--tasks-per-family", "1"]
    assert rp.main(argv) == 0
    read = lambda p: json.loads((out / f"{p}.json").read_text())  # noqa: E731
    assert read("quickstart-train")["steps"] == 2 and "method: qlora" in (out / "quickstart" / "config.yaml").read_text()
    rows = sum(1 for _ in open(out / "quickstart" / "data" / "train.jsonl"))
    assert 0 < read("quickstart-train")["examples"] <= rows  # the rows trained on, after de-duplication
    assert read("quickstart-train")["mean_tokens"] > 0
    assert abs(read("dpo-train")["first_loss"] - 0.6931472) < 1e-4
    merged, tok = rp.quickstart_sft(out / "quickstart")
    trained = open_model(str(out / "quickstart")).model  # the 4-bit base + the adapter, as trained
    ids = tok("Summarise the document in one sentence.", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = merged(ids).logits, trained(ids).logits
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    for name in ("base", "sft", "dpo"):
        r = read(f"{name}-injection")
        assert r["detail"]["counts"] == {"clean": 1, "attacked": len(J.STYLES)}
        for pooled in ("held-out styles", "trained styles"):
            lo, hi = r["intervals"][f"attack success {pooled}"]
            assert 0 <= lo <= r["metrics"][f"attack success {pooled}"] <= hi <= 1
        assert read(f"{name}-tasks")["detail"]["items"] == 7  # one held-out item per trained family
    printed = capsys.readouterr().out
    assert "| attack success hidden-json (trained on) |" in printed and "quickstart SFT + DPO" in printed
    assert rp.main(argv) == 0 and "quickstart-train: done before" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        rp.main(["--quickstart", str(out / "quickstart")])  # a quickstart run without --start quickstart

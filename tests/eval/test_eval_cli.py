"""`tunelab eval` end to end on a tiny saved model: every suite, report files, user JSONL, bad input."""

from __future__ import annotations

import collections
import json

import pytest

from tests.support.eval_fixtures import one_thread  # noqa: F401  (autouse: 1 torch thread)
from tunelab.cli import main
from tunelab.eval.stats import BASELINE_ITEMS, BASELINE_SEED, wilson_interval
from tunelab.eval.tasks import HELDOUT_FAMILIES, TRAIN_FAMILIES, generate_items


@pytest.fixture
def tiny_folder(tmp_path, tiny_llama, tiny_tokenizer):
    folder = tmp_path / "tiny"
    tiny_llama.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_eval_all_suites_writes_report(tiny_folder, tmp_path):
    out = tmp_path / "report"
    assert main(["eval", str(tiny_folder), "--suite", "all", "--n", "2", "--out", str(out)]) == 0
    for name in ("report.md", "report.html", "report.png", "results.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["base"]
    assert set(results["base"]) == {"tasks", "sensitivity", "ppl", "hallucination", "injection"}
    tasks = results["base"]["tasks"]
    m, ci, baseline = tasks["metrics"], tasks["intervals"], tasks["baselines"]
    assert "family sort_words score" in m and tasks["detail"]["items"] == 28 and tasks["detail"]["removed"] == 0
    for name, v in m.items():
        assert ci[name][0] <= v <= ci[name][1], name
    assert m["exact match"] <= m["score (partial credit)"]
    # the constant-answer baseline of a label family: the share of its items with the majority label of
    # another draw of the family (counted here by hand)
    ref = collections.Counter(it.answer for it in generate_items(["parity"], BASELINE_ITEMS, seed=BASELINE_SEED))
    majority = max(ref, key=ref.get)
    assert baseline["family parity score"] == sum(it.answer == majority for it in generate_items(["parity"], 2, 1234)) / 2
    assert results["base"]["ppl"]["metrics"]["ppl held-out prose"] > 100  # a random model is near-uniform over 512
    hal = results["base"]["hallucination"]
    assert hal["intervals"]["unknown_abstention"] == list(wilson_interval(
        round(hal["metrics"]["unknown_abstention"] * 2), 2))
    md = (out / "report.md").read_text()
    assert "## injection" in md and "attack success rate" in md and "| metric | base [95% CI] |" in md
    assert "constant-answer baseline |" in md and "Wilson score intervals" in md
    assert "no task items were removed" in md
    assert "<table>" in (out / "report.html").read_text()


def test_eval_reads_user_jsonl(tiny_folder, tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text(json.dumps({"prompt": "Say hi", "answer": "hi", "check": "contains"}) + "\n"
                    + json.dumps({"prompt": "2+2?", "answer": "4", "family": "math"}) + "\n")
    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"text": "The class statement defines a class.", "source": "a"}) + "\n")
    out = tmp_path / "r"
    assert main(["eval", str(tiny_folder), "--suite", "tasks", "--suite", "ppl", "--data", f"tasks={data}",
                 "--data", f"ppl={texts}", "--out", str(out)]) == 0
    m = json.loads((out / "results.json").read_text())["base"]
    assert set(m["tasks"]["metrics"]) == {"score (partial credit)", "exact match", "family user score",
                                          "family math score"}
    assert set(m["ppl"]["metrics"]) == {"ppl a", "tokens a"}


def test_eval_bad_inputs_are_one_line_errors(tiny_folder, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    assert main(["eval", str(tiny_folder), "--data", f"tasks={bad}", "--out", str(tmp_path / "o")]) == 2
    assert f"{bad}:1: the tasks suite needs a non-empty string field 'answer'" in capsys.readouterr().err
    assert main(["eval", str(tiny_folder), "--data", "nosuch"]) == 2
    assert "SUITE=FILE.jsonl" in capsys.readouterr().err
    assert main(["eval", str(tiny_folder), "--skip-base"]) == 2


def test_eval_adapter_adds_a_tuned_column(tiny_folder, tmp_path):
    import torch

    from tests.support.tiny_models import make_tiny_llama
    from tunelab.lora import LoraConfig, apply_lora, save_adapter

    model = apply_lora(make_tiny_llama(), LoraConfig(r=4, alpha=8, target_modules="all-linear"), verbose=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained-looking adapter, so the tuned model differs from the base
    save_adapter(model, tmp_path / "adapter")
    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"text": "The class statement defines a class. " * 4}) + "\n")
    out = tmp_path / "r"
    assert main(["eval", str(tiny_folder), "--adapter", str(tmp_path / "adapter"), "--suite", "ppl",
                 "--data", f"ppl={texts}", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    base, tuned = (results[k]["ppl"]["metrics"]["ppl user"] for k in ("base", "tuned"))
    assert base != pytest.approx(tuned, rel=1e-3)
    assert "| metric | base | tuned | change |" in (out / "report.md").read_text()
    # the base column (measured with the adapter already loaded, switched off) is the plain model's number
    assert main(["eval", str(tiny_folder), "--suite", "ppl", "--data", f"ppl={texts}", "--out", str(tmp_path / "b")]) == 0
    plain = json.loads((tmp_path / "b" / "results.json").read_text())["base"]["ppl"]["metrics"]
    assert plain == results["base"]["ppl"]["metrics"]


def test_eval_checks_adapter_data_and_out_before_evaluating(tiny_folder, tmp_path, capsys):
    from tests.support.tiny_models import make_tiny_llama
    from tunelab.lora import LoraConfig, apply_lora, save_adapter

    other = apply_lora(make_tiny_llama(hidden_size=32, intermediate_size=64), LoraConfig(r=4, alpha=8), verbose=False)
    save_adapter(other, tmp_path / "adapter")  # made for another base's shapes
    args = ["eval", str(tiny_folder), "--suite", "ppl", "--n", "1", "--out", str(tmp_path / "o")]
    assert main(args + ["--adapter", str(tmp_path / "adapter")]) == 2
    captured = capsys.readouterr()
    assert "different shape" in captured.err and "base: suites" not in captured.out  # failed before the base ran
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    assert main(args + ["--data", f"ppl={latin}"]) == 2
    assert f"{latin}:2: not UTF-8" in capsys.readouterr().err
    a_file = tmp_path / "report.txt"
    a_file.write_text("mine\n")
    assert main(args[:-1] + [str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err and a_file.read_text() == "mine\n"
    assert main(args + ["--batch-size", "0"]) == 2
    assert "--batch-size must be 1 or more" in capsys.readouterr().err


def _lora_run(run, tiny_folder, data_path):
    """A lora run folder (config.yaml + adapter/) trained on `data_path`, its adapter random but non-zero;
    returns the tuned model."""
    import torch

    from tunelab.config import dump_config, load_config
    from tunelab.lora import LoraConfig, apply_lora, save_adapter
    from tunelab.models.load import load_pretrained

    run.mkdir()
    cfg = load_config(None, ["method=lora", f"model.source={tiny_folder}", f"output_dir={run}", "lora.r=4",
                             "lora.alpha=8"], base={"data": {"task": "sft", "sources": [
                                 {"name": "x", "path": str(data_path), "kind": "instructions"}]}})
    (run / "config.yaml").write_text(dump_config(cfg))
    model, _ = load_pretrained(str(tiny_folder))
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=cfg.lora.target_modules), verbose=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_adapter(model, run / "adapter")
    return model


def test_eval_run_folder_rebuilds_the_tuned_model(tiny_folder, tmp_path, capsys):
    """A lora run folder: base from model.source, tuned = base + the run's adapter."""
    from tunelab.models.load import load_pretrained

    run = tmp_path / "run"
    model = _lora_run(run, tiny_folder, tmp_path / "x.jsonl")  # its training data is gone: said, not fatal
    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"text": "The class statement defines a class. " * 4}) + "\n")
    assert main(["eval", str(run), "--suite", "ppl", "--data", f"ppl={texts}"]) == 0
    assert "training data cannot be read" not in capsys.readouterr().out  # no built-in items: nothing to check
    results = json.loads((run / "eval" / "results.json").read_text())
    from tunelab.eval.perplexity import perplexity

    want = perplexity(model, [json.loads(texts.read_text())["text"]], load_pretrained(str(tiny_folder))[1])
    assert results["tuned"]["ppl"]["metrics"]["ppl user"] == pytest.approx(want["ppl"], rel=1e-5)
    assert results["base"]["ppl"]["metrics"]["ppl user"] != pytest.approx(want["ppl"], rel=1e-3)
    assert main(["eval", str(run), "--suite", "tasks", "--n", "1", "--skip-base", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "training data cannot be read" in out and "NOT removed" in (tmp_path / "o" / "report.md").read_text()


def test_eval_run_folder_removes_its_training_prompts_and_checks_the_ppl_text(tiny_folder, tmp_path, capsys):
    from tunelab.eval.heldout import word_ngrams
    from tunelab.eval.heldout_prose import PARAGRAPHS

    items = generate_items(TRAIN_FAMILIES + HELDOUT_FAMILIES, 2, seed=1234)  # what `--n 2` evaluates
    trained = [items[1], items[6], items[27]]
    records = [it.to_sft() for it in trained] + [{"prompt": "Tell me about rivers.", "response": PARAGRAPHS[1]}]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    run = tmp_path / "run"
    _lora_run(run, tiny_folder, data)
    assert main(["eval", str(run), "--suite", "tasks", "--suite", "ppl", "--n", "2"]) == 0
    assert "Removed 3 of 28 task items" in capsys.readouterr().out
    results = json.loads((run / "eval" / "results.json").read_text())
    for label in ("base", "tuned"):
        assert results[label]["tasks"]["detail"]["items"] == 25 and results[label]["tasks"]["detail"]["removed"] == 3
    md = (run / "eval" / "report.md").read_text()
    assert "Removed 3 of 28 task items: their prompt is one of the run's 4 training prompts" in md
    n_grams = len(set().union(*map(word_ngrams, PARAGRAPHS)))
    assert f"{len(word_ngrams(PARAGRAPHS[1]))} of {n_grams} word 8-grams and 0 whole documents of `held-out prose`" in md
    assert "of `task-transcripts` occur" in md


def test_eval_run_folder_with_a_broken_adapter_fails_before_the_base(tiny_folder, tmp_path, capsys):
    from tunelab.config import dump_config, load_config

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    data = {"task": "sft", "sources": [{"name": "x", "path": "x.jsonl", "kind": "instructions"}]}
    cfg = load_config(None, ["method=lora", f"model.source={tiny_folder}", f"output_dir={run}"], base={"data": data})
    (run / "config.yaml").write_text(dump_config(cfg))
    (run / "adapter" / "adapter_config.json").write_text("{broken")
    assert main(["eval", str(run), "--suite", "ppl", "--n", "1"]) == 2
    captured = capsys.readouterr()
    assert "adapter_config.json: not valid JSON" in captured.err and "base: suites" not in captured.out
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{trunc")
    assert main(["eval", str(run), "--suite", "ppl", "--n", "1"]) == 2
    captured = capsys.readouterr()
    assert "not a readable safetensors file" in captured.err and "base: suites" not in captured.out


def test_eval_instruct_collection_reports_held_out_phrasings(tiny_folder, tmp_path):
    from tunelab.eval.instruct_tasks import HELDOUT_FAMILIES as HELD
    from tunelab.eval.instruct_tasks import TRAIN_FAMILIES as TRAIN

    out = tmp_path / "report"
    assert main(["eval", str(tiny_folder), "--collection", "instruct", "--n", "1", "--out", str(out)]) == 0
    tasks = json.loads((out / "results.json").read_text())["base"]["tasks"]
    # every family once under its training phrasings, and the trained families once more under held-out ones
    assert tasks["detail"]["items"] == len(TRAIN) + len(HELD) + len(TRAIN)
    m = tasks["metrics"]
    for group in ("train families", "train families, held-out phrasings", "held-out families"):
        assert 0 <= m[f"{group} exact match"] <= m[f"{group} score (partial credit)"] <= 1
    assert f"family {HELD[0]} score" in m and "family sort_words score" not in m
    assert "--collection instruct" in (out / "report.md").read_text()

"""data.task=spans: record checks, offsets -> BIO labels in windows, the token head in PEFT's layout, span
metrics on hand-made spans, and `tunelab train` + `tunelab detect` on a tiny model (issue 27)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tests.support.eval_fixtures import one_thread  # noqa: F401  (autouse: 1 torch thread)
from tests.support.tiny_run import make_workspace, run_config
from tunelab.cli import main
from tunelab.data import spans as S
from tunelab.errors import DataError
from tunelab.eval.spans import bio_metrics, decode, postprocess, predict_docs, redact
from tunelab.models.token_cls import from_causal_lm

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota".split()


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("bad, message", [
    ({"text": "abc", "spans": [{"start": 1, "end": 9, "label": "x"}]}, "spans[0] [1, 9) is outside the text (0..3)"),
    ({"text": "abcdef", "spans": [{"start": 0, "end": 3, "label": "x"}, {"start": 2, "end": 5, "label": "x"}]},
     "spans [0, 3) and [2, 5) of label 'x' overlap"),
    ({"text": "abc", "spans": [{"start": 0, "end": 2, "label": "pii"}]}, "unknown label 'pii'"),
    ({"text": "abc", "spans": [{"start": "0", "end": 2, "label": "x"}]}, "must be integers"),
    ({"tokens": ["a", "b"], "tags": ["O", "I-x"]}, "tags[1] is 'I-x' but the previous tag is not B-/I-x"),
    ({"tokens": ["a", "b"], "tags": ["O"]}, "one tag per token"),
    ({"text": "abc"}, "needs text+spans or tokens+tags"),
    ({"text": "abc", "spans": [{"start": 0, "end": 1, "label": ""}]}, "label a non-empty string"),
    ({"text": "a", "spans": [], "tokens": ["a"], "tags": ["O"]}, "both 'spans' and 'tokens'"),
    ({"text": "abc", "spans": "[]"}, "write span records as JSONL or Parquet"),
    ({"tokens": ["a"], "tags": ["B-"]}, "use O, B-<label> or I-<label>"),
    ([1, 2], "expected a JSON object per line"),
])
def test_bad_records_are_one_line_naming_file_and_line(tmp_path, bad, message):
    good = {"text": "abc", "spans": [{"start": 0, "end": 1, "label": "x"}]}
    path = _jsonl(tmp_path / "d.jsonl", [good, bad])
    with pytest.raises(DataError) as e:
        S.read_docs(path, labels=["x"])
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value) and "\n" not in str(e.value)


def test_bad_span_records_in_parquet_and_eval_files_name_file_and_row(tmp_path, capsys):
    """The row number of a Parquet file; a bad record of data.test_path stops `tunelab train` with exit 2 and
    one line, before any model loads; so does a bad line of `tunelab detect --input`."""
    import pandas as pd

    pd.DataFrame({"text": ["abc", "abcd"], "spans": [[], [{"start": 2, "end": 9, "label": "x"}]]}).to_parquet(
        tmp_path / "b.parquet")
    with pytest.raises(DataError, match=rf"^{tmp_path / 'b.parquet'}:2: spans\[0\] \[2, 9\) is outside"):
        S.read_docs(str(tmp_path / "b.parquet"))
    ws = make_workspace(tmp_path, records=1)
    good = _jsonl(tmp_path / "g.jsonl", _marker_docs(4, 0))
    bad = _jsonl(tmp_path / "t.jsonl", _marker_docs(2, 1) + [{"text": "ab", "spans": [{"start": 0, "end": 3, "label": "m"}]}])
    cfg = run_config(ws, tmp_path / "run", model={"source": str(tmp_path / "missing-model")},
                     data={"task": "spans", "sources": [{"name": "m", "path": good}], "test_path": bad})
    capsys.readouterr()
    assert main(["train", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{bad}:3: spans[0] [0, 3) is outside the text (0..2)" in err
    (tmp_path / "in.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    assert main(["detect", str(tmp_path / "run"), "--input", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{tmp_path / 'in.jsonl'}:2:" in err and "text" in err


def test_bio_layout_becomes_char_spans_and_labels_are_counted(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [
        {"tokens": ["Call", "Ann", "Lee", "now"], "tags": ["O", "B-name", "I-name", "O"]},
        {"tokens": ["mail", "a@b.c"], "tags": ["O", "B-email"]},
        {"text": "Ann.", "spans": [{"start": 0, "end": 3, "label": "name"}]}])
    docs = S.read_docs(path)
    assert docs[0].text == "Call Ann Lee now" and docs[0].spans == [(5, 12, "name")]
    assert docs[0].text[5:12] == "Ann Lee" and docs[1].spans == [(5, 10, "email")]
    assert S.label_counts(docs) == "spans per label: email 1, name 2; documents without spans: 0"
    assert S.tag_names(["email", "name"]) == ["O", "B-email", "I-email", "B-name", "I-name"]


def test_offsets_to_bio_tags():
    offsets = [(0, 4), (4, 8), (8, 9), (9, 15), (15, 20)]
    spans = [(5, 12, "b"), (15, 20, "a")]  # "b" covers tokens 1-3 partly; "a" exactly token 4
    assert S.token_tags(offsets, spans, ["a", "b"]) == [0, 3, 4, 4, 1]


def test_windows_label_each_token_once(tiny_tokenizer):
    assert S.windows(10, 4, 1) == [(0, 4, 0), (3, 7, 4), (6, 10, 7)]
    assert S.windows(3, 4, 1) == [(0, 3, 0)]
    text = " ".join(random.Random(0).choice(WORDS) for _ in range(60))
    doc = S.SpanDoc(text, [(12, 40, "x"), (200, 260, "x")], ("mem", 1))
    ids, _, tags, _ = S.encode_doc(doc, tiny_tokenizer, ["x"], 16, 5)
    rows = S.rows([doc], tiny_tokenizer, ["x"], 16, 5)
    assert len(rows) > 3 and all(len(r["input_ids"]) <= 16 for r in rows)
    kept = [t for r in rows for t in r["labels"] if t != S.IGNORE]
    assert kept == tags and sum(len(r["input_ids"]) for r in rows) == len(ids) + 5 * (len(rows) - 1)
    assert [r["position_ids"][0] for r in rows] == [0] * len(rows)


def _classifier(seed=0, layers=None):
    from tests.support.tiny_models import make_tiny_llama

    return from_causal_lm(make_tiny_llama(seed=seed), ["x", "y"], layers)


def test_windowed_prediction_keeps_each_token_from_its_first_window(tiny_tokenizer):
    model = _classifier().eval()
    text = " ".join(random.Random(1).choice(WORDS) for _ in range(40))
    (_, probs), = predict_docs(model, tiny_tokenizer, [text], seq_len=12, stride=4, batch_size=3)
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    for a, b, first in S.windows(len(ids), 12, 4):
        with torch.no_grad():
            want = model(input_ids=torch.tensor([ids[a:b]])).logits[0].softmax(-1)
        torch.testing.assert_close(probs[first:b], want[first - a:], atol=1e-6, rtol=1e-5)


def test_head_matches_transformers_token_classifier_for_llama():
    from transformers import LlamaForTokenClassification

    model = _classifier().eval()
    ref = LlamaForTokenClassification(model.config).eval()
    ref.model.load_state_dict(model.model.state_dict())
    ref.score.load_state_dict(model.score.state_dict())
    ids = torch.randint(0, 512, (2, 9))
    torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-6, rtol=1e-5)
    assert len(_classifier(layers=1).model.layers) == 1


def test_head_saved_in_peft_layout_and_loaded_by_peft(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from tunelab.lora import LoraConfig, apply_lora, save_adapter

    model = apply_lora(_classifier(), LoraConfig(r=4, alpha=8, modules_to_save=["score"]), verbose=False)
    with torch.no_grad():  # a trained-looking adapter: B and the head away from their initial values
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    save_adapter(model, tmp_path / "a")
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert "base_model.model.score.weight" in saved and saved["base_model.model.score.weight"].shape == (5, 64)
    peft = PeftModel.from_pretrained(_classifier(), tmp_path / "a").eval()
    names = dict(peft.named_parameters())
    assert "base_model.model.score.modules_to_save.default.weight" in names
    torch.testing.assert_close(names["base_model.model.score.modules_to_save.default.weight"],
                               saved["base_model.model.score.weight"])
    ids = torch.randint(0, 512, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(peft(input_ids=ids).logits, model.eval()(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-4)


def test_decode_postprocess_and_metrics_by_hand():
    # tags for labels [x, y]: 1 B-x, 2 I-x, 3 B-y, 4 I-y
    assert decode([0, 1, 2, 2, 0, 4, 4, 3, 1, 2]) == [(1, 4, 0), (5, 7, 1), (7, 8, 1), (8, 10, 0)]
    assert postprocess([(0, 2, 0), (3, 5, 0), (9, 10, 0), (2, 3, 1)], gap=1, min_len=2) == [(0, 5, 0)]
    gold = [[(1, 4, 0), (6, 8, 1)], [(0, 2, 0)]]
    pred = [[(1, 4, 0), (6, 9, 1)], [(0, 1, 0), (5, 6, 1)]]
    m = bio_metrics(pred, gold, ["x", "y"])
    # x: tokens pred {1,2,3} + {0} = 4, gold 3 + 2 = 5, tp 3 + 1 = 4; spans pred 2, gold 2, exact 1
    assert m["x"]["token"]["precision"] == pytest.approx(4 / 4) and m["x"]["token"]["recall"] == pytest.approx(4 / 5)
    assert m["x"]["span"]["precision"] == pytest.approx(1 / 2) and m["x"]["span"]["recall"] == pytest.approx(1 / 2)
    # y: tokens pred {6,7,8} + {5} = 4, gold 2, tp 2; spans pred 2, gold 1, exact 0
    assert m["y"]["token"]["precision"] == pytest.approx(2 / 4) and m["y"]["token"]["recall"] == 1.0
    assert m["y"]["span"]["f1"] == 0.0
    assert m["micro"]["token"]["precision"] == pytest.approx(6 / 8) and m["micro"]["span"]["recall"] == pytest.approx(1 / 3)
    f1 = 2 * (1 / 4) * (1 / 3) / (1 / 4 + 1 / 3)
    assert m["micro"]["span"]["f1"] == pytest.approx(f1)
    spans = [{"start": 4, "end": 11, "label": "pii"}, {"start": 0, "end": 2, "label": "x"}]
    assert redact("Hi, Ann Lee!", spans) == "[X], [PII]!"
    text = "ring 555.123.4567 and ask"  # a phone and an address on the same characters, a name inside the phone
    spans = [{"start": 5, "end": 17, "label": "phone"}, {"start": 5, "end": 17, "label": "address"},
             {"start": 9, "end": 12, "label": "name"}, {"start": 22, "end": 25, "label": "x"}]
    assert redact(text, spans) == "ring [PHONE] and [X]"


def _marker_docs(n: int, seed: int) -> list[dict]:
    """Random words; the spans to find are the runs `zeta eta` (label m)."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        words = [rng.choice(WORDS[:5]) for _ in range(12)]
        at = rng.randrange(1, 10)
        words[at:at + 2] = ["zeta", "eta"]
        text = " ".join(words)
        start = len(" ".join(words[:at])) + 1
        out.append({"text": text, "spans": [{"start": start, "end": start + len("zeta eta"), "label": "m"}]})
    return out


@pytest.fixture(scope="module")
def spans_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("spans")
    ws = make_workspace(d, records=4)
    _jsonl(d / "spans.jsonl", _marker_docs(48, 0))
    _jsonl(d / "test.jsonl", _marker_docs(8, 1))
    cfg = run_config(ws, d / "run", data={"task": "spans", "sources": [{"name": "m", "path": str(d / "spans.jsonl")}],
                                          "eval_fraction": 0.2, "test_path": str(d / "test.jsonl"), "stride": 8},
                     train={"max_steps": 30, "lr": 1e-2, "eval_every": 15, "seq_len": 32})
    assert main(["train", str(cfg), "--no-progress"]) == 0
    return d


def test_train_writes_metrics_and_detect_finds_the_spans(spans_run, capsys):
    d, run = spans_run, spans_run / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_span_f1" in r] == [15, 30]
    assert rows[-1]["spans"]["postprocess"]["chosen_on"].startswith("validation")
    info = json.loads((run / "spans.json").read_text())
    assert info["labels"] == ["m"] and set(info["test"]) == {"raw", "post", "documents"}
    assert info["test"]["post"]["m"]["span"]["f1"] > 0.5  # a learnable marker: far above chance (0)
    docs = _marker_docs(4, 7)
    _jsonl(d / "new.jsonl", [{"id": i, "text": r["text"]} for i, r in enumerate(docs)])
    assert main(["detect", str(run), "--input", str(d / "new.jsonl"), "--out", str(d / "out.jsonl"), "--redact"]) == 0
    out = [json.loads(line) for line in (d / "out.jsonl").read_text().splitlines()]
    hits = 0
    for rec, doc in zip(out, docs, strict=True):
        gold = doc["spans"][0]
        hits += any((s["start"], s["end"]) == (gold["start"], gold["end"]) for s in rec["spans"])
        for s in rec["spans"]:
            assert rec["text"][s["start"]:s["end"]] == s["text"] and 0 < s["score"] <= 1 and s["label"] == "m"
        assert rec["redacted"] == redact(rec["text"], rec["spans"]) and rec["id"] == docs.index(doc)
    assert hits >= 2  # this weak tiny detector (raw validation span F1 0.17) with the validation's choice


@pytest.mark.parametrize("post", [
    {"gap": 0, "min_len": 1, "snap": "words", "chosen_on": "a test"},  # one setting (a run before per-label choice)
    {"gap": 0, "min_len": 1, "snap": "off", "chosen_on": "a test", "by": "per-label",  # the label's own wins
     "labels": {"m": {"gap": 0, "min_len": 1, "snap": "words"}}},
])
def test_detect_and_guard_apply_the_runs_snapping(spans_run, tmp_path, post):
    """A run whose spans.json chose snap=words (for all labels, or for its label m over a pooled snap off):
    tunelab detect and the guard both return spans snapped to whole words, the same ones (one post-processing
    for every reader of the run)."""
    import shutil

    from tunelab.eval.guard import Guard
    from tunelab.eval.spans import snap_chars

    run = shutil.copytree(spans_run / "run", tmp_path / "run")
    info = json.loads((run / "spans.json").read_text())
    info["postprocess"] = post
    (run / "spans.json").write_text(json.dumps(info))
    docs = [{"text": r["text"].replace(" zeta", " x.zeta", 1) + "."} for r in _marker_docs(4, 7)]
    _jsonl(tmp_path / "in.jsonl", docs)
    assert main(["detect", str(run), "--input", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl")]) == 0
    out = [json.loads(line)["spans"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert out == Guard(run).spans([d["text"] for d in docs]) and any(out)
    for doc, spans in zip(docs, out):
        for s in spans:
            assert (s["start"], s["end"]) == snap_chars(doc["text"], s["start"], s["end"])  # whole words, no period
            assert s["start"] == 0 or doc["text"][s["start"] - 1] == " "


def test_rescore_write_rebuilds_the_runs_spans_json(spans_run, tmp_path):
    """--rescore --write scores the finished run again (the same documents, the same choice on validation)
    and replaces a stale spans.json with what training wrote."""
    import os
    import shutil
    import subprocess
    import sys

    run = shutil.copytree(spans_run / "run", tmp_path / "run")
    fresh = json.loads((run / "spans.json").read_text())
    (run / "spans.json").write_text(json.dumps({**fresh, "postprocess": {"gap": 5, "min_len": 3, "chosen_on": "old"}}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-m", "tunelab.train.spans", str(run), "--rescore", "--write"], check=True,
                   env=env, capture_output=True)
    again = json.loads((run / "spans.json").read_text())
    assert again["postprocess"] == fresh["postprocess"]
    assert again["test"]["post"]["m"]["span"] == pytest.approx(fresh["test"]["post"]["m"]["span"])


def test_qlora_spans_run_and_bad_record_exit_2(tmp_path, capsys):
    ws = make_workspace(tmp_path, records=4)
    data = _marker_docs(12, 2)
    path = _jsonl(tmp_path / "s.jsonl", data)
    cfg = run_config(ws, tmp_path / "q", method="qlora", model={"keep_layers": 1},
                     data={"task": "spans", "sources": [{"name": "m", "path": path}], "eval_fraction": 0.0, "stride": 8},
                     train={"max_steps": 2, "seq_len": 32})
    assert main(["train", str(cfg), "--no-progress"]) == 0
    saved = json.loads((tmp_path / "q" / "adapter" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["score"] and not any("layers.1." in t for t in saved["target_modules"])
    data[3]["spans"][0]["label"] = "other"
    _jsonl(tmp_path / "s.jsonl", data)
    cfg = run_config(ws, tmp_path / "bad", data={"task": "spans", "labels": ["m"], "sources": [{"name": "m", "path": path}]})
    capsys.readouterr()
    assert main(["train", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{path}:4: unknown label 'other'" in err


@pytest.mark.parametrize("case", ["llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma2",
                                  "gemma3_text", "phi3", "olmo2", "granite", "cohere"])
def test_every_family_becomes_a_token_classifier(case):
    """The head on each family's body: the same logits as transformers' *ForTokenClassification where there is
    one; LoRA + head get gradients from the token loss, the frozen body none."""
    import transformers

    from tests.models.test_families import CASES, _model
    from tunelab.lora import LoraConfig, apply_lora
    from tunelab.train.loss import token_classification_loss_sum

    assert case in CASES
    model = from_causal_lm(_model(case), ["x"]).eval()
    ids = torch.randint(0, 96, (2, 7))
    ref_cls = getattr(transformers, CASES[case][2].__name__.replace("ForCausalLM", "ForTokenClassification"), None)
    if ref_cls is not None:
        ref = ref_cls(model.config).eval()
        ref.model.load_state_dict(model.model.state_dict())
        ref.score.load_state_dict(model.score.state_dict())
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
    apply_lora(model, LoraConfig(r=2, alpha=4, modules_to_save=["score"]), verbose=False)
    labels = torch.randint(0, 3, (2, 7))
    loss, n = token_classification_loss_sum(model.train(), {"input_ids": ids, "labels": labels})
    loss.backward()
    assert n == 14 and torch.isfinite(loss)
    grads = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("score" in g for g in grads) and any("lora_A" in g or "lora_B" in g for g in grads)
    assert all("score" in g or "lora_" in g for g in grads)


def _onehot(tags, n_tags=3):  # (tokens, tags) probabilities of an argmax decoder that outputs `tags`
    return torch.nn.functional.one_hot(torch.tensor(tags), n_tags).float()


def _tokens(*pieces):
    """(text, offsets) of a document written as its token strings."""
    offsets, pos = [], 0
    for p in pieces:
        offsets.append((pos, pos + len(p)))
        pos += len(p)
    return "".join(pieces), offsets


def test_postprocessing_is_chosen_on_the_given_documents():
    from tunelab.eval.spans import choose_postprocess, scored_metrics

    words = _tokens("a", " b", " c", " d", " e", " f", " g", " h")  # whole words: snapping changes nothing
    split = [(*words, _onehot([0, 1, 2, 0, 2, 2, 0, 0])), (*words, _onehot([1, 2, 2, 0, 0, 1, 0, 0]))]  # a gap; a stray
    gold = [[(1, 6, 0)], [(0, 3, 0)]]
    assert scored_metrics(split, gold, ["x"])["x"]["span"]["f1"] == pytest.approx(2 * 0.25 * 0.5 / 0.75)
    best = choose_postprocess(split, gold, ["x"])
    setting = {"gap": 1, "min_len": 2, "snap": "off"}  # the smallest change reaching F1 1
    assert best == {**setting, "by": "per-label", "labels": {"x": setting}}
    assert scored_metrics(split, gold, ["x"], best)["x"]["span"]["f1"] == 1.0
    assert choose_postprocess(split, gold, ["x"], by="pooled") == {**best, "by": "pooled"}


def _two_label_docs():
    """Labels [x, y, z] (tags 1 B-x, 2 I-x, 3 B-y, 4 I-y, 5 B-z, 6 I-z) on single-word tokens: x is predicted
    with a one-token hole (closing gaps of 1 makes it exact), y as two spans one token apart that are two gold
    spans (closing the gap joins them: wrong), z never occurs."""
    words = _tokens("a", " b", " c", " d", " e", " f", " g", " h")
    x = ((*words, _onehot([1, 2, 0, 2, 2, 0, 0, 0], 7)), [(0, 5, 0)])
    y = ((*words, _onehot([3, 4, 0, 3, 4, 0, 0, 0], 7)), [(0, 2, 1), (3, 5, 1)])
    return x, y


def test_per_label_choice_beats_the_pooled_one_where_labels_need_different_settings():
    """Pooled (micro F1) the x documents outweigh the y one and gap 1 wins for all, breaking y's spans; per
    label, x gets gap 1 and y gap 0, both exact; z, with no gold span, takes the pooled setting."""
    from tunelab.eval.spans import choose_postprocess, scored_metrics

    x, y = _two_label_docs()
    docs, gold = map(list, zip(x, x, y))
    labels = ["x", "y", "z"]
    pooled = choose_postprocess(docs, gold, labels, by="pooled")
    gap1, gap0 = {"gap": 1, "min_len": 1, "snap": "off"}, {"gap": 0, "min_len": 1, "snap": "off"}
    assert pooled == {**gap1, "by": "pooled", "labels": {"x": gap1, "y": gap1, "z": gap1}}
    per = choose_postprocess(docs, gold, labels)
    assert per == {**gap1, "by": "per-label", "labels": {"x": gap1, "y": gap0, "z": gap1}}
    m_pooled, m_per = scored_metrics(docs, gold, labels, pooled), scored_metrics(docs, gold, labels, per)
    # pooled: x 2 of 2 exact, y's two gold spans joined into one wrong span: micro 2 tp, 3 pred, 4 gold
    assert m_pooled["y"]["span"]["f1"] == 0.0 and m_pooled["micro"]["span"]["f1"] == pytest.approx(4 / 7)
    assert m_per["x"]["span"]["f1"] == 1.0 and m_per["y"]["span"]["f1"] == 1.0 and m_per["micro"]["span"]["f1"] == 1.0


@pytest.mark.parametrize("text, start, end, snapped", [
    ("mail ann.lee@x.com today", 9, 14, "ann.lee@x.com"),          # inside a word: out to its whitespace
    ("write to ann.lee@x.com.", 9, 23, "ann.lee@x.com"),           # a sentence's period dropped
    ("call (555) 123-4567, now", 6, 14, "(555) 123-4567"),          # a balanced bracket kept
    ("call 555-123-4567) now", 5, 12, "555-123-4567"),              # an unbalanced closer dropped
    ("mail (ann@x.com), now", 7, 10, "ann@x.com"),                 # a wrapping pair and the comma dropped
    ('said "Lee, Ann". ok', 6, 9, "Lee,"[:3]),                       # a quote, then punctuation, at the ends
    ("to +44 20 7946 0958; bye", 4, 16, "+44 20 7946 0958"),       # several words, the first and last completed
    ("Ship to: Ann Lee -- x", 8, 13, "Ann"),                        # leading whitespace dropped first
    ("a , b", 1, 3, ""),                                            # only punctuation: nothing left
])
def test_snap_chars_by_hand(text, start, end, snapped):
    from tunelab.eval.spans import snap_chars

    a, b = snap_chars(text, start, end)
    assert text[a:b] == snapped and (a < b or not snapped)


def test_snap_words_maps_back_to_tokens_and_joins_pieces_of_one_word():
    from tunelab.eval.spans import char_spans, scored_spans, snap_words

    text, offsets = _tokens("mail", " ann", ".", "lee", "@", "x", ".", "com", ".", " Ann", " Lee", " ;")
    # B-x on "lee" .. "com": snapped to the whole email (tokens 1-7), the sentence's period (token 8) left out
    assert snap_words([(3, 8, 0)], text, offsets) == [(1, 8, 0)]
    assert snap_words([(8, 9, 0)], text, offsets) == [(1, 8, 0)]  # the period's word is the email
    assert snap_words([(11, 12, 0)], text, offsets) == []  # a word of punctuation only: no characters left
    assert snap_words([(9, 10, 1), (10, 11, 1)], text, offsets) == [(9, 10, 1), (10, 11, 1)]  # touching: apart
    # two pieces of one word become one span after snapping; the name (label y) keeps its own
    tags = [0, 0, 0, 1, 0, 2, 0, 0, 0, 3, 4, 0]  # labels [x, y]: 1 B-x, 2 I-x, 3 B-y, 4 I-y
    probs = _onehot(tags, 5)
    assert [s[:3] for s in scored_spans(probs, {"gap": 0, "min_len": 1, "snap": "off"}, text, offsets)] == [
        (3, 4, 0), (5, 6, 0), (9, 11, 1)]
    spans = scored_spans(probs, {"gap": 0, "min_len": 1, "snap": "words"}, text, offsets)
    assert [s[:3] for s in spans] == [(1, 8, 0), (9, 11, 1)]
    assert spans[0][3] == pytest.approx(2 / 7)  # the mean probability of x over the 7 tokens, 2 of them marked
    found = char_spans(text, offsets, spans, ["x", "y"], "words")
    assert [(s["text"], s["label"]) for s in found] == [("ann.lee@x.com", "x"), ("Ann Lee", "y")]


def _fake_task(monkeypatch, labels, split, calls=None):
    """A SpanTask whose validation documents are split["v"] and test documents split["t"] (each a list of
    ((text, offsets, probs), gold spans)), predicted without a model; `calls` records which split was asked."""
    import types

    from tunelab.train.spans import SpanTask

    task = object.__new__(SpanTask)
    task.labels, task.val, task.test = labels, ["v"] * len(split["v"]), ["t"] * len(split["t"])
    task.cfg = types.SimpleNamespace(train=types.SimpleNamespace(seq_len=16),
                                     data=types.SimpleNamespace(stride=4, postprocess="per-label"))

    def predict(model, tok, docs):
        if calls is not None:
            calls.append(docs[0])
        return tuple(map(list, zip(*split[docs[0]])))

    monkeypatch.setattr(task, "_predict", predict)
    return task


def test_per_label_choice_is_made_on_validation_only_then_fixed_for_test(monkeypatch):
    """SpanTask.scores chooses each label's setting from the validation predictions before the test split is
    even predicted, and applies it to a test split where the opposite settings would be exact."""
    from tunelab.eval import spans as E

    x, y = _two_label_docs()
    words = x[0][:2]
    x_test = ((*words, _onehot([1, 2, 0, 2, 2, 0, 0, 0], 7)), [(0, 2, 0), (3, 5, 0)])  # here gap 0 is right
    y_test = ((*words, _onehot([3, 4, 0, 4, 4, 0, 0, 0], 7)), [(0, 5, 1)])  # and here gap 1
    calls, choose = [], E.choose_postprocess

    def spy(docs, gold, labels, by):
        calls.append("choose")
        return choose(docs, gold, labels, by)

    monkeypatch.setattr(E, "choose_postprocess", spy)
    result = _fake_task(monkeypatch, ["x", "y", "z"], {"v": [x, x, y], "t": [x_test, y_test]}, calls).scores(None, None)
    assert calls == ["v", "choose", "t"]
    assert {k: v["gap"] for k, v in result["postprocess"]["labels"].items()} == {"x": 1, "y": 0, "z": 1}
    assert result["validation"]["post"]["micro"]["span"]["f1"] == 1.0
    assert result["test"]["post"]["x"]["span"]["f1"] == 0.0 and result["test"]["post"]["y"]["span"]["f1"] == 0.0
    assert result["test"]["raw"]["x"]["span"]["f1"] == 1.0  # the raw argmax was right there: no choosing on test


def test_snapping_is_chosen_on_validation_then_fixed_for_test(monkeypatch):
    """SpanTask.scores: validation documents where snapping makes partial emails exact choose snap=words; the
    test split is scored with it, although there it breaks an exact span (no choosing on the test set)."""
    val_text, val_off = _tokens("mail", " ann", ".", "lee", "@", "x", ".", "com", " today")
    val = [((val_text, val_off, _onehot([0, 0, 0, 1, 2, 2, 2, 2, 0])), [(1, 8, 0)])] * 3
    test_text, test_off = _tokens("tel", ":", "555", "-", "1234", " ok")  # gold: the number, not "tel:"
    test = [((test_text, test_off, _onehot([0, 0, 1, 2, 2, 0])), [(2, 5, 0)])]
    task = _fake_task(monkeypatch, ["x"], {"v": val, "t": test})
    result = task.scores(None, None)
    setting = {"gap": 0, "min_len": 1, "snap": "words"}
    assert result["postprocess"] == {**setting, "by": "per-label", "labels": {"x": setting},
                                     "chosen_on": "validation (3 documents)"}
    assert result["validation"]["raw"]["x"]["span"]["f1"] == 0.0 and result["validation"]["post"]["x"]["span"]["f1"] == 1.0
    assert result["test"]["raw"]["x"]["span"]["f1"] == 1.0 and result["test"]["post"]["x"]["span"]["f1"] == 0.0


def test_builtin_injection_span_sets_are_seeded_and_disjoint():
    train, val, test = (S.read_docs(f"local:injection-spans{s}", labels=["injection"]) for s in ("", "-val", "-heldout"))
    assert (len(train), len(val), len(test)) == (240, 60, 60)
    assert [d.text for d in S.read_docs("local:injection-spans-val")] == [d.text for d in val]
    assert not {d.text for d in train} & {d.text for d in val} and not {d.text for d in val} & {d.text for d in test}
    for d in train[:40]:
        assert all(d.text[a:b].strip() == d.text[a:b] and "\n" not in d.text[a:b] for a, b, _ in d.spans)
    assert sum(bool(d.spans) for d in test) == 40  # 20 documents x 2 held-out styles, plus 20 clean twins


def test_keyword_baseline_marks_whole_lines(spans_run):
    from tunelab.eval.spans import keyword_spans
    from tunelab.train.spans import baseline

    text = "Summarise.\n  Please IGNORE this.  \nA town.\nsystem: x"
    assert [text[a:b] for a, b in keyword_spans(text)] == ["Please IGNORE this.", "system: x"]
    m = baseline(spans_run / "run", "keyword")  # marker documents hold no keyword: nothing marked
    assert m["test"]["raw"]["m"]["span"]["recall"] == 0.0 and m["test"]["documents"] == 8


def test_remove_spans_cuts_characters_and_emptied_lines():
    from tunelab.eval.guard import remove_spans

    text = "Task.\n\nDoc one.\n```python\n# evil\n```\nDoc two. PRINT X now"
    a = text.index("```")
    spans = [{"start": a, "end": text.index("```", a + 3) + 3}, {"start": text.index("PRINT"), "end": text.index(" now")}]
    assert remove_spans(text, spans) == "Task.\n\nDoc one.\nDoc two.  now"  # the own blank line stays
    assert remove_spans("abc", []) == "abc" and remove_spans("abc", [{"start": 0, "end": 3}]) == ""


def test_guard_cleans_generate_and_chat_prompts(spans_run, capsys):
    """generate --guard answers the prompt with the detected spans cut: the same answer as the cleaned prompt
    given directly; chat --guard cleans each user turn; a run that is not a spans run is a one-line error."""
    import io

    from tunelab.eval.guard import Guard, remove_spans
    from tunelab.export.chat import chat_loop

    run, model = spans_run / "run", spans_run / "model"
    guard = Guard(run)
    found = guard.spans([r["text"] for r in _marker_docs(4, 7)])  # the documents detect finds >= 3 of 4 in
    texts = [r["text"] for r, f in zip(_marker_docs(4, 7), found) if any(s["text"] == "zeta eta" for s in f)]
    assert len(texts) >= 2
    found = guard.spans(texts)
    cleaned = guard.clean(texts)
    assert cleaned == [remove_spans(t, f) for t, f in zip(texts, found)] and cleaned[0] != texts[0]
    capsys.readouterr()
    args = ["generate", str(model), "--no-chat", "--max-new-tokens", "4"]
    assert main(args + ["--guard", str(run), "--prompt", texts[0]]) == 0
    guarded = capsys.readouterr()
    assert f"removed {len(texts[0]) - len(cleaned[0])} characters from 1 of 1 prompts" in guarded.err
    assert main(args + ["--prompt", cleaned[0]]) == 0
    assert capsys.readouterr().out == guarded.out
    out = io.StringIO()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    assert chat_loop(AutoModelForCausalLM.from_pretrained(model), tok, io.StringIO(texts[1] + "\n"), out,
                     max_new_tokens=2, guard=guard) == 1
    assert f"[guard: removed {len(texts[1]) - len(cleaned[1])} characters from 1 of 1 prompts]" in out.getvalue()
    assert main(args + ["--guard", str(model), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (progress bars of earlier loads come before it)
    assert err.startswith("tunelab generate: error: ") and "not a finished spans run" in err


def test_injection_suite_with_and_without_a_guard(spans_run):
    """compare() scores the same items both ways; a guard that cuts exactly the gold injections removes every
    canary, touches no clean document, and no attack can succeed (the canary is no longer in the prompt)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.eval import injection as J
    from tunelab.eval.guard import compare, table

    class Oracle:  # the gold spans: what a perfect detector would cut
        def spans(self, texts):
            gold = {it.prompt: it.meta["span"] for it in J.make_items(2, 5)}
            return [[{"start": gold[t][0], "end": gold[t][1]}] if gold[t] else [] for t in texts]

    model = spans_run / "model"
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    r = compare(AutoModelForCausalLM.from_pretrained(model), tok, Oracle(), n=2, seed=5, batch_size=4)
    assert r["items"] == {"documents": 2, "seed": 5, "attacked": 10, "clean": 2}
    g = r["guard"]
    assert g["canary removed"]["value"] == 1.0 and g["injection characters removed"]["value"] == 1.0
    assert g["clean documents changed"]["value"] == 0.0 and g["canary removed"]["interval"][0] > 0.6
    assert r["with guard"]["metrics"]["attack success rate"] == 0.0
    assert set(r["with guard"]["metrics"]) == set(r["without guard"]["metrics"])
    assert "| attack success rate | " in table(r) and "| canary removed | 1.000 [" in table(r)


def test_builtin_pii_span_sets_hold_out_formats_and_regex_baseline():
    import re

    from tunelab.data import pii

    labels = list(pii.LABELS)
    train, val, test = (S.read_docs(f"local:pii-spans{s}", labels=labels) for s in ("", "-val", "-heldout"))
    assert (len(train), len(val), len(test)) == (400, 100, 100)
    assert [d.text for d in S.read_docs("local:pii-spans-heldout")] == [d.text for d in test]
    pii_texts = lambda docs: {d.text for d in docs if d.spans}  # noqa: E731  (filler-only documents may repeat)
    assert not pii_texts(train) & pii_texts(val) and not pii_texts(val) & pii_texts(test)
    assert {s[2] for d in train for s in d.spans} == set(labels) == {s[2] for d in test for s in d.spans}
    values = lambda docs, lab: [d.text[a:b] for d in docs for a, b, k in d.spans if k == lab]  # noqa: E731
    for d in train + test:  # a span is the value alone: no surrounding space or final punctuation
        assert all(d.text[a:b] == d.text[a:b].strip(" .,;|-") for a, b, _ in d.spans)
    # the phone layouts never overlap: train is NNN-NNN-NNNN / (NNN) NNN-NNNN, test +44 / +49 / dots
    assert all(re.fullmatch(r"\(?\d{3}\)?[ -]\d{3}-\d{4}", v) for v in values(train, "phone"))
    assert not any(re.fullmatch(r"\(?\d{3}\)?[ -]\d{3}-\d{4}", v) for v in values(test, "phone"))
    assert not set(values(test, "name")) & {f"{f} {la}" for f in pii.FIRST for la in pii.LAST}
    text = "Call Ann Lee at (555) 123-4567 or ann.lee@mail.com; ship to 12 Oak Street, Springfield. Order 4821-7731."
    assert [(text[a:b], k) for a, b, k in pii.regex_spans(text)] == [
        ("Call Ann", "name"), ("(555) 123-4567", "phone"), ("ann.lee@mail.com", "email"),
        ("12 Oak Street, Springfield", "address")]


def _encoder_folder(d, kind: str):
    """A tiny random encoder (masked-LM checkpoint + the tiny tokenizer) built from transformers' config class."""
    import transformers

    from tests.support.tiny_models import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    small = dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, max_position_embeddings=128, pad_token_id=tok.pad_token_id or 0)
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = {"bert": transformers.BertConfig(**small, **no_dropout),
              "deberta-v2": transformers.DebertaV2Config(**small, **no_dropout),
              "modernbert": transformers.ModernBertConfig(**small, global_attn_every_n_layers=2, local_attention=16)}[kind]
    torch.manual_seed(0)
    transformers.AutoModelForMaskedLM.from_config(config).save_pretrained(d / kind)
    tok.save_pretrained(d / kind)
    return d / kind


@pytest.mark.parametrize("kind", ["bert", "deberta-v2", "modernbert"])
def test_encoder_folder_becomes_a_token_classifier(tmp_path, kind):
    """An encoder folder loads as a body (is_encoder; a decoder folder is not one); under tunelab's head its
    logits equal transformers' *ForTokenClassification with the same weights (eval mode, no dropout) where
    that class is the body + one linear (BERT, DeBERTa-v2); keep_layers cuts encoder.layer / layers."""
    import transformers

    from tunelab.models.token_cls import is_encoder, load_encoder

    folder = _encoder_folder(tmp_path, kind)
    make_workspace(tmp_path, records=1)
    assert is_encoder(str(folder)) and not is_encoder(str(tmp_path / "model")) and not is_encoder("bundled")
    body, tok = load_encoder(str(folder))
    model = from_causal_lm(body, ["x"]).eval()
    ids = torch.tensor([tok("alpha beta gamma delta", add_special_tokens=False)["input_ids"]])
    if kind != "modernbert":  # ModernBERT's class puts a dense + norm head before its classifier
        ref = transformers.AutoModelForTokenClassification.from_pretrained(folder, num_labels=3).eval()
        ref.classifier.load_state_dict(model.score.state_dict())
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
    cut = from_causal_lm(load_encoder(str(folder))[0], ["x"], layers=1)
    assert len(cut.model.layers if kind == "modernbert" else cut.model.encoder.layer) == 1
    assert cut(input_ids=ids).logits.shape == (1, ids.shape[1], 3)


def test_encoder_spans_run_trains_lora_and_detects(tmp_path, capsys):
    """tunelab train with model.source = a tiny BERT folder: LoRA on the encoder's linears (not the unused
    pooler), the head in full; the marker spans are learned; tunelab detect and --guard open the run."""
    from safetensors.torch import load_file

    folder = _encoder_folder(tmp_path, "bert")
    ws = make_workspace(tmp_path, records=1)
    path = _jsonl(tmp_path / "s.jsonl", _marker_docs(48, 0))
    cfg = run_config(ws, tmp_path / "run", model={"source": str(folder)},
                     data={"task": "spans", "sources": [{"name": "m", "path": path}], "eval_fraction": 0.25, "stride": 8},
                     train={"max_steps": 60, "lr": 1e-2, "seq_len": 32})
    assert main(["train", str(cfg), "--no-progress"]) == 0
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert any("encoder.layer.1.attention.self.query.lora_A" in k for k in saved)
    assert not any("pooler" in k for k in saved) and "base_model.model.score.weight" in saved
    info = json.loads((tmp_path / "run" / "spans.json").read_text())
    # a random 2-layer encoder over a near character-level tokenizer: the marker's tokens (also inside beta,
    # theta) need context; 0.73 in the run made while writing this test, all-O scores 0
    assert info["validation"]["post"]["m"]["token"]["f1"] > 0.5
    _jsonl(tmp_path / "new.jsonl", [{"text": r["text"]} for r in _marker_docs(8, 7)])
    assert main(["detect", str(tmp_path / "run"), "--input", str(tmp_path / "new.jsonl"),
                 "--out", str(tmp_path / "out.jsonl")]) == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert all(r["text"][s["start"]:s["end"]] == s["text"] for r in out for s in r["spans"])
    assert sum("zeta" in s["text"] for r in out for s in r["spans"]) >= 4


def test_checkpoint_detector_equals_the_finished_run_at_its_last_step(spans_run):
    from tunelab.train.spans import checkpoint_detector, open_detector

    run = spans_run / "run"
    last = sorted((run / "checkpoints").glob("step-*"))[-1]
    assert last.name == "step-00000030"
    a, tok, _ = open_detector(run)
    b, _ = checkpoint_detector(run, last)
    ids = torch.tensor([tok("alpha zeta eta beta", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits, atol=1e-6, rtol=1e-5)

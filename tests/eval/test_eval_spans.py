"""Span detector: token labels from character spans, metrics on hand-made labels, LoRA + head training."""

from __future__ import annotations

import pytest
import torch

from tests.support.eval_fixtures import one_thread  # noqa: F401  (autouse: 1 torch thread)
from tunelab.eval import injection as J
from tunelab.eval.spans import (
    close_gaps,
    evaluate_detector,
    runs,
    span_metrics,
    token_classifier,
    token_labels,
    train_detector,
)


def test_token_labels_cover_exactly_the_injection(tiny_tokenizer):
    for it in J.make_items(3, seed=0):
        ids, labels = token_labels(tiny_tokenizer, it)
        assert len(ids) == len(labels)
        marked = tiny_tokenizer.decode([i for i, v in zip(ids, labels) if v])
        if it.meta["span"] is None:
            assert sum(labels) == 0
        else:
            a, b = it.meta["span"]
            assert marked.strip() == it.prompt[a:b].strip()  # byte-level BPE: tokens align with the text
            assert len(runs(labels)) == 1


def test_span_metrics_on_hand_made_labels():
    gold = [[0, 1, 1, 1, 0, 0], [0, 0, 0, 0]]
    pred = [[0, 1, 1, 0, 0, 1], [0, 0, 0, 0]]
    m = span_metrics(pred, gold)
    assert m["token"]["precision"] == pytest.approx(2 / 3) and m["token"]["recall"] == pytest.approx(2 / 3)
    assert m["span"]["precision"] == 0.5 and m["span"]["recall"] == 1.0  # (1,3) matches (1,4) at IoU 2/3
    assert m["span"]["f1"] == pytest.approx(2 / 3)
    assert span_metrics([[0, 1, 0, 0]], [[0, 0, 1, 1]])["span"]["f1"] == 0.0  # no overlap
    assert span_metrics(gold, gold)["token"]["f1"] == 1.0 and span_metrics(gold, gold)["span"]["f1"] == 1.0
    assert runs([1, 1, 0, 1]) == [(0, 2), (3, 4)]


def test_detector_trains_only_lora_and_head(tmp_path, tiny_llama, tiny_tokenizer):
    tiny_llama.save_pretrained(tmp_path / "m", safe_serialization=True)
    model = token_classifier(tmp_path / "m", lora_r=4, lora_alpha=8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    items = J.make_items(4, seed=1, styles=J.TRAIN_STYLES)
    losses = train_detector(model, tiny_tokenizer, items, steps=20, batch_size=2, lr=1e-2, log_every=0)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n or "score" in n for n in changed)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n and "score" not in n)
    r = evaluate_detector(model, tiny_tokenizer, J.make_items(2, seed=5, styles=J.HELDOUT_STYLES))
    assert set(r) == {"token", "span", "items_per_s", "n"} and r["n"] == 6


def test_close_gaps_joins_split_spans_only():
    assert close_gaps([1, 1, 0, 1, 0, 0, 0, 0, 1], gap=1) == [1, 1, 1, 1, 0, 0, 0, 0, 1]
    assert close_gaps([0, 1, 0, 0, 1, 0], gap=2) == [0, 1, 1, 1, 1, 0]
    assert close_gaps([1, 0, 0, 0, 1], gap=2) == [1, 0, 0, 0, 1]
    assert close_gaps([0, 0, 0], gap=5) == [0, 0, 0]  # never invents a span

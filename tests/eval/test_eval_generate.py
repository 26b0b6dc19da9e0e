"""Batched generation and perplexity on tiny models, against independent references."""

from __future__ import annotations

import math

import pytest
import torch

from tests.support.eval_fixtures import one_thread  # noqa: F401  (autouse: 1 torch thread)
from tunelab.eval.generate import generate, render_prompts
from tunelab.eval.perplexity import perplexity
from tunelab.eval.tasks import evaluate_items, generate_items

PROMPTS = ["Sort these words", "What is the value of x in the expression below, given a function call?",
           "hi", "Reverse the order of the words in this list please", "a b c d", "The class statement"]


def _eos_biased(model, eos: int, bias: float):
    """Replace lm_head by a copy with a bias on the EOS logit, so EOS comes sooner (bias 0.3) or at once (1e4)."""
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True,
                           dtype=model.lm_head.weight.dtype)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[eos] = bias
    model.lm_head = head
    return model


def _greedy_reference(model, tokenizer, text, max_new_tokens, eos):
    """One prompt, no padding, no cache: append the argmax token until EOS. Returns (text, #new tokens)."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
            if nxt == eos:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True).strip(), len(new)


def test_batched_generation_matches_one_by_one_greedy(tiny_llama, tiny_tokenizer):
    # float64 so left padding cannot flip a near-tie argmax; bias 0.3 makes rows stop at different steps
    model = _eos_biased(tiny_llama.double(), tiny_tokenizer.eos_token_id, 0.3)
    out = generate(model, tiny_tokenizer, PROMPTS, max_new_tokens=12, batch_size=4, progress=False)
    ref = [_greedy_reference(model, tiny_tokenizer, t, 12, tiny_tokenizer.eos_token_id)
           for t in render_prompts(tiny_tokenizer, PROMPTS)]
    lengths = [n for _, n in ref]
    assert min(lengths) < 12 and max(lengths) == 12  # the batch mixes early stops and full-length rows
    assert out == [t for t, _ in ref]
    assert tiny_tokenizer.padding_side == "right"  # restored after generation


def test_generation_stops_at_eos(tiny_llama, tiny_tokenizer):
    model = _eos_biased(tiny_llama, tiny_tokenizer.eos_token_id, 1e4)
    assert generate(model, tiny_tokenizer, PROMPTS, max_new_tokens=16, progress=False) == [""] * len(PROMPTS)


def test_evaluate_items_reports_accuracy_and_speed(tiny_llama, tiny_tokenizer):
    items = generate_items(["add", "parity"], 3, seed=0)
    r = evaluate_items(tiny_llama, tiny_tokenizer, items, batch_size=4)
    assert r["n"] == 6 and len(r["outputs"]) == 6 and r["items_per_s"] > 0
    assert set(r["per_family"]) == {"add", "parity"}
    assert r["accuracy"] == pytest.approx(sum(r["scores"]) / 6)


def _nll_float64(model, ids: list[int]) -> tuple[float, int]:
    """Sum of -log p(token t+1 | tokens <= t) for one sequence, in float64, no batching."""
    m = model.double()
    with torch.no_grad():
        logp = torch.log_softmax(m(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return -sum(float(logp[t, ids[t + 1]]) for t in range(len(ids) - 1)), len(ids) - 1


def test_perplexity_equals_exp_mean_nll_in_float64(tiny_tokenizer):
    from tests.support.tiny_models import make_tiny_llama

    texts = ["The class statement defines a class.", "x", "Assignment statements bind names to objects " * 5]
    got = perplexity(make_tiny_llama(), texts, tiny_tokenizer, seq_len=16, batch_size=2)
    # independent: tokenize, append EOS, cut into 16-token windows, score each window on its own in float64
    ref_model = make_tiny_llama()
    total = count = 0
    for t in texts:
        ids = tiny_tokenizer(t, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
        for i in range(0, len(ids), 16):
            if len(ids[i:i + 16]) >= 2:
                nll, n = _nll_float64(ref_model, ids[i:i + 16])
                total, count = total + nll, count + n
    assert got["tokens"] == count
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    # batch size does not change the answer (token-weighted mean, padding masked)
    again = perplexity(make_tiny_llama(), texts, tiny_tokenizer, seq_len=16, batch_size=3)
    assert again["loss"] == pytest.approx(got["loss"], rel=1e-5)


def test_perplexity_on_examples_scores_only_labelled_tokens():
    from tests.support.tiny_models import make_tiny_llama

    ids = list(range(10, 30))
    labels = [-100] * 12 + ids[12:]  # e.g. an SFT example: loss on the response only
    got = perplexity(make_tiny_llama(), [{"input_ids": ids, "labels": labels}], seq_len=64)
    m = make_tiny_llama().double()
    with torch.no_grad():
        logp = torch.log_softmax(m(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    ref = [-float(logp[t, ids[t + 1]]) for t in range(11, 19)]
    assert got["tokens"] == len(ref) == 8
    assert got["loss"] == pytest.approx(sum(ref) / len(ref), rel=1e-5)

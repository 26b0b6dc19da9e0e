"""Preference tuning: per-sequence log-probabilities through the chunked head, and the objectives."""

import pytest
import torch

from numerics import assert_as_accurate
from test_families import _batch, _model, _unknown
from tunelab.train.preference import sequence_logps


def _reference_logps(model, batch):
    """transformers' full logits -> log_softmax -> gather, summed over each row's label tokens (B,)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits[:, :-1]
    y = batch["labels"][:, 1:]
    per_token = logits.log_softmax(-1).gather(2, y.clamp_min(0)[..., None]).squeeze(2)
    return (per_token * (y != -100)).sum(1)


def _value_and_grads(fn, model, batch, weights):
    """logps (B,) and the gradients of sum(weights * logps): each row weighed differently, as a preference
    loss does, so a gradient that treats rows alike fails."""
    model.zero_grad(set_to_none=True)
    logps = fn(model, batch)
    (logps * weights.to(logps.dtype)).sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _ours(chunk):
    return lambda model, batch: sequence_logps(model, batch, chunk=chunk)[0]


# llama: the last-layer shortcut; gemma2: softcap; granite: a logits scale; unknown: the model's own logits
@pytest.mark.parametrize("case", ["llama", "gemma2", "granite", "unknown"])
@pytest.mark.parametrize("head_trains", [False, True])
def test_sequence_logps_equal_full_logits_values_and_gradients(case, head_trains):
    """float64: values and every gradient to 1e-10 relative; float32: as accurate as transformers' float32
    full logits against float64 (tests/numerics.py). Chunks of 5 tokens split rows across chunks."""
    weights = torch.tensor([0.7, -1.3, 2.1])
    results = {}
    for dtype in (torch.float64, torch.float32):
        model = (_unknown() if case == "unknown" else _model(case)).to(dtype)
        model.get_output_embeddings().requires_grad_(head_trains)
        batch = _batch()
        results[dtype] = (_value_and_grads(_ours(5), model, batch, weights),
                          _value_and_grads(_reference_logps, model, batch, weights))
    (got64, grads64), (ref64, ref_grads64) = results[torch.float64]
    (got32, grads32), (ref32, ref_grads32) = results[torch.float32]
    _, tokens = sequence_logps(model, batch)
    assert tokens.tolist() == (batch["labels"][:, 1:] != -100).sum(1).tolist()
    torch.testing.assert_close(got64, ref64, rtol=1e-10, atol=0)
    assert_as_accurate(got32, ref32, ref64, what="logps")
    assert grads64.keys() == ref_grads64.keys() == grads32.keys()
    assert any(n.endswith("lm_head.weight") for n in grads64) == head_trains
    for name, g in grads64.items():
        torch.testing.assert_close(g, ref_grads64[name], rtol=1e-10, atol=1e-10 * float(g.abs().max()), msg=name)
        assert_as_accurate(grads32[name], ref_grads32[name], ref_grads64[name], what=name)


def test_sequence_logps_never_build_full_logits():
    """Forward and backward: every tensor with a vocabulary-sized last dimension that any operation
    produces (seen by a TorchDispatchMode, local to this block) has at most `chunk` rows; the reference
    path, as a check of the check, builds (B, T, V) logits."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self, vocab):
            super().__init__()
            self.vocab, self.seen = vocab, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab:
                    self.seen.append(tuple(t.shape))
            return out

    model = _model("llama")
    V = model.config.vocab_size
    for fn, check in ((_ours(4), lambda shapes: all(len(s) == 2 and s[0] <= 4 for s in shapes)),
                      (_reference_logps, lambda shapes: any(len(s) == 3 for s in shapes))):
        model.zero_grad(set_to_none=True)
        with Shapes(V) as mode:
            fn(model, _batch()).sum().backward()
        C = model.config.hidden_size
        logits = [s for s in mode.seen if s not in ((V, C), (C, V))]  # the head's weight, its transpose
        assert logits and check(logits), logits

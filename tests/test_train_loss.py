"""The chunked head+loss equals the plain full-logits loss of transformers, values and gradients."""

import pytest
import torch

from conftest import make_tiny_llama
from tunelab.train.loss import causal_lm_loss_sum


def _batch(vocab=512, B=3, T=17, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :9] = -100  # a prompt without loss
    labels[2, -4:] = -100  # padding
    mask = torch.ones(B, T, dtype=torch.long)
    mask[2, -4:] = 0
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@pytest.mark.parametrize("train_head", [False, True])
@pytest.mark.parametrize("chunk,blocks", [(5, (4, 37)), (1024, (1024, 2048))])
def test_matches_transformers_loss_and_grads(train_head, chunk, blocks, monkeypatch):
    """A frozen head goes through (token x vocabulary) tiles, here ragged ones; a trained head through
    token chunks."""
    from tunelab.train import loss as loss_mod

    monkeypatch.setattr(loss_mod, "TOKEN_BLOCK", blocks[0])
    monkeypatch.setattr(loss_mod, "VOCAB_BLOCK", blocks[1])
    model = make_tiny_llama().double()
    batch = _batch()
    for p in model.parameters():
        p.requires_grad_(True)
    model.lm_head.weight.requires_grad_(train_head)
    ref = model(**batch).loss  # mean over label tokens, float64
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    total, n = causal_lm_loss_sum(model, batch, chunk=chunk)
    assert n == int((batch["labels"][:, 1:] != -100).sum())
    (total / n).backward()
    torch.testing.assert_close(total / n, ref.float(), rtol=1e-6, atol=1e-6)
    assert (model.lm_head.weight.grad is not None) == train_head
    for name, g in ref_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, g, rtol=1e-5, atol=1e-7, msg=name)


def test_no_label_tokens_gives_zero_loss():
    model = make_tiny_llama()
    batch = _batch()
    batch["labels"][:] = -100
    total, n = causal_lm_loss_sum(model, batch)
    assert n == 0 and float(total.detach()) == 0.0


@pytest.mark.parametrize("shift_always", [False, True])
@pytest.mark.parametrize("head_trains", [True, False])
@pytest.mark.parametrize("scale,shift", [(1.0, 0.0), (400.0, 0.0), (1.0, -200.0), (1.0, 95.0)])
def test_head_loss_matches_torch_cross_entropy_for_any_logit_range(scale, shift, head_trains, shift_always,
                                                                   monkeypatch):
    """Plain logits take the exp-without-shift path; huge ones (overflow), very negative ones (underflow)
    and a constant +95 (every exp overflows) take the max-shifted path. Bias and head gradients included;
    a frozen head runs in (16 tokens x 7 vocabulary rows) tiles, so some tiles overflow and some not.
    shift_always: the GPU's way, every token chunk shifted by its max without a host check."""
    from tunelab.train import loss as loss_mod
    from tunelab.train.loss import linear_cross_entropy_sum

    if shift_always:
        monkeypatch.setattr(loss_mod, "_shift_always", lambda z: True)
    g = torch.Generator().manual_seed(3)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    head = torch.nn.Linear(16, 50)
    with torch.no_grad():
        head.weight.copy_(torch.randn(50, 16, generator=g) * scale / 4)
        head.bias.fill_(shift)
        if scale > 1:  # one token block overflows, the others take the fast path
            h[16:].div_(scale)
    head.requires_grad_(head_trains)
    y = torch.randint(0, 50, (37,), generator=g)
    total = linear_cross_entropy_sum(h, head, y, chunk=8, blocks=(16, 7))
    total.backward()
    # reference: torch's own cross-entropy over full fp32 logits (fp64 would differ by fp32's rounding of
    # logits in the hundreds, not by anything of ours)
    h32, w32, b32 = (t.detach().clone().requires_grad_() for t in (h, head.weight, head.bias))
    ref = torch.nn.functional.cross_entropy(h32 @ w32.t() + b32, y, reduction="sum")
    ref.backward()
    assert torch.isfinite(total)
    torch.testing.assert_close(total, ref, rtol=2e-6, atol=1e-4)
    pairs = [(h.grad, h32.grad)] + [(head.weight.grad, w32.grad), (head.bias.grad, b32.grad)] * head_trains
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (head.weight.grad is None) != head_trains

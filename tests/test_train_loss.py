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
@pytest.mark.parametrize("chunk", [5, 1024])
def test_matches_transformers_loss_and_grads(train_head, chunk):
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

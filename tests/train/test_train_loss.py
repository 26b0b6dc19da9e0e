"""The chunked head+loss equals the plain full-logits loss of transformers, values and gradients."""

import pytest
import torch

from tests.support.numerics import assert_as_accurate
from tests.support.tiny_models import make_tiny_llama
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
    # reference: torch's own cross-entropy over full fp32 logits; ours sums the same logits' exps in other
    # orders (tiles, chunks), so both are held to their distance from the float64 computation
    h32, w32, b32 = (t.detach().clone().requires_grad_() for t in (h, head.weight, head.bias))
    ref = torch.nn.functional.cross_entropy(h32 @ w32.t() + b32, y, reduction="sum")
    ref.backward()
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (h, head.weight, head.bias))
    ref64 = torch.nn.functional.cross_entropy(h64 @ w64.t() + b64, y, reduction="sum")
    ref64.backward()
    assert torch.isfinite(total)
    assert_as_accurate(total, ref, ref64, what="loss")
    triples = [(h.grad, h32.grad, h64.grad, "dh")]
    if head_trains:
        triples += [(head.weight.grad, w32.grad, w64.grad, "dW"), (head.bias.grad, b32.grad, b64.grad, "db")]
    for got, want, exact, name in triples:
        assert_as_accurate(got, want, exact, what=name)
    assert (head.weight.grad is None) != head_trains


def _prompt_batch(vocab=512, T=23, prompts=(6, 11, 8), pad_last=0, seed=2):
    """Rows whose first `prompts[i]` tokens carry no loss; the last row padded by `pad_last` tokens on the
    right (> 0) or on the left (< 0; its first 7 positions, so its queries at 5 and 6 see only padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(prompts), T), generator=g)
    labels = ids.clone()
    for i, p in enumerate(prompts):
        labels[i, :p] = -100
    batch = {"input_ids": ids, "labels": labels}
    if pad_last:
        mask = torch.ones_like(ids)
        pad = slice(T - pad_last, T) if pad_last > 0 else slice(0, -pad_last)
        mask[-1, pad] = 0
        labels[-1, pad] = -100
        batch["attention_mask"] = mask
    return batch


def _rows_seen(model):
    """Positions each decoder layer's MLP receives, per layer, recorded by hooks."""
    seen = []
    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_hook(lambda m, a, o, i=i: seen.append((i, a[0].shape[1])))
    return seen


def _tiny(arch: str, attn: str):
    import transformers

    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False, attn_implementation=attn)
    torch.manual_seed(0)
    if arch == "llama":
        return make_tiny_llama(attn_implementation=attn)
    if arch == "qwen2":  # biased q/k/v
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common)).eval()
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=16, **common)).eval()  # q/k norms


def _loss_and_grads(model, batch, last_layer=True):
    """Loss and gradients through the chunked head, with or without the last-layer shortcut."""
    import dataclasses

    from tunelab.accel.kernels import choose

    kernels = choose(model, "auto")
    kernels = dataclasses.replace(kernels, last_layer=kernels.last_layer and last_layer)
    model.zero_grad(set_to_none=True)
    total, n = causal_lm_loss_sum(model, batch, kernels=kernels)
    (total / n).backward()
    return total / n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
# Left padding over position 5 leaves query rows that see only padding: transformers' own eager loss is NaN
# there (float64), so that case runs with SDPA only.
@pytest.mark.parametrize(("attn", "pad_last"), [("sdpa", 0), ("sdpa", 4), ("sdpa", -7), ("eager", 0), ("eager", 4)])
def test_last_layer_skips_prompt_positions(arch, attn, pad_last):
    """With every row's loss starting at position >= 5, the last layer of a Llama-formula decoder runs its
    queries, MLP and norms on positions 5.. only (Qwen3, whose attention norms q and k, runs whole). Loss
    and every gradient equal those of the whole last layer to float64 rounding (with SDPA), and
    transformers' full-logits ones to the float32 loss sum's (as in the test above)."""
    model = _tiny(arch, attn).double()
    model.requires_grad_(True)
    model.lm_head.requires_grad_(False)  # a trained head's logits go through float32; a frozen one stays float64
    batch = _prompt_batch(pad_last=pad_last)
    ref = model(**batch).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    whole, whole_grads = _loss_and_grads(model, batch, last_layer=False)

    seen = _rows_seen(model)
    loss, grads = _loss_and_grads(model, batch)
    T, start = batch["input_ids"].shape[1], 5  # labels[:, 6] is the first label: position 5 predicts it
    assert seen == [(0, T), (1, T if arch == "qwen3" else T - start)]
    assert "forward" not in vars(model.model.layers[-1])  # the layer's own forward is back
    torch.testing.assert_close(loss, whole, rtol=1e-12 if attn == "sdpa" else 1e-6, atol=0)
    torch.testing.assert_close(loss, ref.float(), rtol=1e-6, atol=1e-6)
    assert grads.keys() == whole_grads.keys() == ref_grads.keys()
    # transformers' eager attention takes its softmax in float32; the skip's SDPA stays in float64
    tight = dict(rtol=1e-10, atol=1e-13) if attn == "sdpa" else dict(rtol=1e-5, atol=1e-7)
    for name, g in grads.items():
        torch.testing.assert_close(g, whole_grads[name], **tight, msg=name)
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_last_layer_skip_under_gradient_checkpointing_and_lora():
    """LoRA adapters on every linear, gradient checkpointing on, training mode: the same loss and adapter
    gradients as the whole last layer."""
    from tunelab.lora import LoraConfig, apply_lora
    from tunelab.train.run import enable_checkpointing

    model = apply_lora(make_tiny_llama().double(), LoraConfig(r=4, alpha=8))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    enable_checkpointing(model)
    model.train()
    assert model.model.layers[-1].gradient_checkpointing
    batch = _prompt_batch()
    whole, whole_grads = _loss_and_grads(model, batch, last_layer=False)
    seen = _rows_seen(model)
    loss, grads = _loss_and_grads(model, batch)
    assert (1, batch["input_ids"].shape[1] - 5) in seen
    torch.testing.assert_close(loss, whole, rtol=1e-12, atol=0)
    assert grads and grads.keys() == whole_grads.keys()
    assert all("lora_" in k for k in grads)
    for k, g in grads.items():
        torch.testing.assert_close(g, whole_grads[k], rtol=1e-10, atol=1e-13, msg=k)

"""QLoRA: LoRA over tunelab.quant.Linear4bit. The base stays 4-bit through training; merging goes into the
original full-precision weights (or, explicitly and with a warning, into the de-quantized ones)."""

import math

import pytest
import torch
from torch import nn

from tests.support.numerics import assert_within, lora_forward_bound
from tests.support.tiny_models import make_tiny_llama
from tunelab.errors import TunelabError
from tunelab.lora import (
    LoraConfig,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_layers,
    lora_param_groups,
    merge_adapter,
    merge_lora,
    save_adapter,
)
from tunelab.quant import Linear4bit, quantize_model

IDS = torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def qlora_model(**cfg):
    """A tiny Llama quantized to NF4 (block 64, double quant) with LoRA on every 4-bit linear."""
    model = quantize_model(make_tiny_llama(), "nf4", block_size=64, double_quant=True)
    return apply_lora(model, LoraConfig(**{"r": 4, "alpha": 8, **cfg}), verbose=False)


def randomize_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


def packed_state(model):
    """Every 4-bit layer's packed codes and its byte count."""
    return {p: (m.qweight.data.clone(), m.nbytes) for p, m in model.named_modules() if isinstance(m, Linear4bit)}


@pytest.mark.parametrize("use_dora", [False, True])
def test_qlora_training_keeps_base_4bit_and_trains_adapters_only(use_dora):
    model = qlora_model(use_dora=use_dora).train()
    layers = dict(lora_layers(model))
    assert len(layers) == 14 and all(isinstance(m.base, Linear4bit) for m in layers.values())
    before_packed = packed_state(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(lora_param_groups(model, lr=1e-2, loraplus_ratio=8))
    for step in range(2):
        model(IDS, labels=IDS).loss.backward()
        if step == 1:  # B moved off zero at step 0, so A gets gradient too from here on
            for layer in layers.values():
                assert layer.lora_A.weight.grad.abs().sum() > 0 and layer.lora_B.weight.grad.abs().sum() > 0
        assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad), "frozen got grad"
        opt.step()
        opt.zero_grad()

    # Frozen weights are still the same packed 4-bit bytes: NF4 + double quant is ~4.13 bits per weight.
    after_packed = packed_state(model)
    assert after_packed.keys() == before_packed.keys()
    for path, (codes, nbytes) in before_packed.items():
        assert torch.equal(after_packed[path][0], codes) and after_packed[path][1] == nbytes, path
        m = model.get_submodule(path)
        assert codes.dtype == torch.uint8 and 8 * nbytes / (m.in_features * m.out_features) < 4.2, path
    # No float copy of a frozen weight appeared: the only float matrices in linears are lm_head and A / B.
    float_linears = {p for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert float_linears == {"lm_head"} | {f"{p}.lora_{x}" for p in layers for x in "AB"}
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("use_dora", [False, True])
def test_qlora_layer_matches_float64_formula_on_dequantized_weight(use_dora):
    torch.manual_seed(0)
    base = Linear4bit.from_linear(nn.Linear(128, 32))
    layer = LoRALinear(base, r=4, alpha=8, use_dora=use_dora)
    nn.init.normal_(layer.lora_B.weight, std=0.2)
    if use_dora:  # m was initialised from the de-quantized weight's row norms
        W = base.dequantize_weight(torch.float32)
        assert torch.allclose(layer.lora_magnitude_vector, W.norm(dim=1), atol=1e-6)
        layer.lora_magnitude_vector.data.mul_(1.3)
    x = torch.randn(3, 128)
    W, b, A, B = (t.detach().double() for t in (base.dequantize_weight(), base.bias, layer.lora_A.weight,
                                                layer.lora_B.weight))
    W2, factor = W + 2.0 * B @ A, None
    if use_dora:
        factor = layer.lora_magnitude_vector.detach().double() / W2.norm(dim=1)
        W2 = factor[:, None] * W2
    bound = lora_forward_bound(x, W, b, A, B, 2.0, factor)
    assert_within(layer(x), x.double() @ W2.T + b, bound, "QLoRA layer against float64")


def test_qlora_merge_goes_into_full_precision_weights(tmp_path):
    full = make_tiny_llama()
    base_weights = {k: v.detach().clone() for k, v in full.state_dict().items()}
    model = qlora_model(target_modules=["q_proj", "down_proj"])
    randomize_b(model)
    save_adapter(model, tmp_path)
    # The ideal: the same adapter on the full-precision model (what a merged model should reproduce).
    ideal_logits = logits(load_adapter(make_tiny_llama(), tmp_path, verbose=False))
    deltas = {p: (layer.lora_B.weight.double() @ layer.lora_A.weight.double()) * 2.0 for p, layer in lora_layers(model)}

    with pytest.raises(TunelabError, match="base_weights=<the original full-precision state dict>"):
        merge_lora(model)
    with pytest.raises(TunelabError, match="in place over a 4-bit base"):
        merge_adapter(model)

    merged = merge_lora(model, base_weights=base_weights)
    assert not any(isinstance(m, (LoRALinear, Linear4bit)) for m in merged.modules())
    for path, delta in deltas.items():  # W_fp + scale B A, in float64
        expected = base_weights[path + ".weight"].double() + delta
        assert torch.allclose(merged.get_submodule(path).weight.double(), expected, atol=1e-6), path
    untouched = "model.layers.0.self_attn.k_proj.weight"  # a 4-bit layer without adapter: back to fp exactly
    assert torch.equal(merged.state_dict()[untouched], base_weights[untouched])
    assert (logits(merged) - ideal_logits).abs().max() <= 1e-5

    from_4bit = qlora_model(target_modules=["q_proj", "down_proj"])
    load_adapter(from_4bit, tmp_path)
    with pytest.warns(UserWarning, match="4-bit rounding error"):
        lossy = merge_lora(from_4bit, from_quantized=True)
    q = "model.layers.0.self_attn.q_proj"
    dequantized = Linear4bit.from_linear(full.get_submodule(q)).dequantize_weight().double()
    assert torch.allclose(lossy.get_submodule(q).weight.double(), dequantized + deltas[q], atol=1e-6)
    # Merging into the de-quantized weights is measurably further from the ideal model.
    assert (logits(lossy) - ideal_logits).abs().max() > 100 * (logits(merged) - ideal_logits).abs().max()


def test_qlora_merge_rejects_base_weights_of_another_shape():
    model = qlora_model(target_modules=["q_proj"])
    other = {k: v for k, v in make_tiny_llama(hidden_size=32, intermediate_size=64).state_dict().items()}
    with pytest.raises(TunelabError, match=r"base_weights\['model\.layers\.0\.self_attn\.q_proj\.weight'\] has "
                                           r"shape \(32, 32\) but the 4-bit layer .* is \(64, 64\)"):
        merge_lora(model, base_weights=other)


def test_qlora_parameter_count_counts_logical_4bit_weights():
    plain = sum(p.numel() for p in make_tiny_llama().parameters())
    model = qlora_model(target_modules=["q_proj"])
    trainable = 2 * (4 * 64 + 64 * 4)
    assert model.lora_counts == (trainable, plain + trainable)
    assert math.isclose(100 * trainable / (plain + trainable), 100 * model.lora_counts[0] / model.lora_counts[1])

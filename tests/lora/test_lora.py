"""LoRA invariants (only adapters train, disable = base, merge = W + scale B A) and clear errors on bad input."""

import math

import pytest
import torch
from torch import nn

from tests.support.numerics import assert_within, lora_forward_bound
from tests.support.tiny_models import make_tiny_llama
from tunelab.errors import ConfigError, TunelabError
from tunelab.lora import (
    LoraConfig,
    LoRALinear,
    ModuleToSave,
    apply_lora,
    disable_adapters,
    load_adapter,
    lora_layers,
    lora_param_groups,
    merge_adapter,
    merge_lora,
    remove_lora,
    save_adapter,
    unmerge_adapter,
)

IDS = torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def randomize_b(model, seed=1):
    """B = 0 at init makes every check below trivially true; give it (and DoRA's m) real values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
            if layer.use_dora:
                layer.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(layer.base.out_features, generator=g))


def lora_model(**cfg):
    cfg = {"r": 4, "alpha": 8, **cfg}
    return apply_lora(make_tiny_llama(), LoraConfig(**cfg), verbose=False)


# --- one layer against float64 math -------------------------------------------------------------------

@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_layer_forward_matches_float64_formula(use_dora, use_rslora):
    torch.manual_seed(0)
    base = nn.Linear(24, 16)
    layer = LoRALinear(base, r=4, alpha=6, use_rslora=use_rslora, use_dora=use_dora)
    nn.init.normal_(layer.lora_B.weight, std=0.2)
    if use_dora:
        layer.lora_magnitude_vector.data.mul_(1.5)
    x = torch.randn(3, 5, 24)

    W, b, A, B = (t.detach().double() for t in (base.weight, base.bias, layer.lora_A.weight, layer.lora_B.weight))
    scale = 6 / (math.sqrt(4) if use_rslora else 4)
    assert layer.scale == pytest.approx(scale)
    W2, factor = W + scale * B @ A, None
    if use_dora:  # DoRA: m * V / ||V||_row, V = W + scale B A (Liu et al. 2024, eq. 5)
        factor = layer.lora_magnitude_vector.detach().double() / W2.norm(dim=1)
        W2 = factor[:, None] * W2
    bound = lora_forward_bound(x, W, b, A, B, scale, factor)
    assert_within(layer(x), x.double() @ W2.T + b, bound, "LoRA layer against float64")


def test_init_kaiming_and_gaussian_with_zero_b():
    base = nn.Linear(256, 64)
    kaiming = LoRALinear(base, r=8, alpha=16)
    assert kaiming.lora_A.weight.abs().max() <= 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt 5) bound
    assert kaiming.lora_A.weight.std().item() == pytest.approx(1 / math.sqrt(3 * 256), rel=0.1)
    gaussian = LoRALinear(base, r=8, alpha=16, init="gaussian")
    assert gaussian.lora_A.weight.std().item() == pytest.approx(1 / 8, rel=0.1)
    for layer in (kaiming, gaussian):
        assert not layer.lora_B.weight.any()
        assert layer.dropout is None  # dropout 0: no module, no extra op in forward


def test_fresh_adapter_leaves_output_unchanged_and_prints_counts(capsys):
    base_logits = logits(make_tiny_llama())
    model = apply_lora(make_tiny_llama(), LoraConfig(r=4, alpha=8, target_modules=["q_proj"], use_dora=True))
    assert torch.allclose(logits(model), base_logits, atol=1e-6)
    # 2 layers x (A 4x64 + B 64x4 + m 64) on top of the base's parameters; PEFT prints the same line.
    trainable, base = 2 * (4 * 64 + 64 * 4 + 64), sum(p.numel() for p in make_tiny_llama().parameters())
    assert model.lora_counts == (trainable, base + trainable)
    assert f"trainable params: {trainable:,} || all params: {base + trainable:,}" in capsys.readouterr().out


# --- targets -------------------------------------------------------------------------------------------

def test_all_linear_skips_output_head_and_names_regex_select_paths():
    all_linear = [p for p, _ in lora_layers(lora_model())]
    assert len(all_linear) == 2 * 7 and "lm_head" not in all_linear
    regex = [p for p, _ in lora_layers(lora_model(target_modules=r"model\.layers\.1\..*_proj"))]
    assert regex == [p for p in all_linear if p.startswith("model.layers.1.")]
    names = [p for p, _ in lora_layers(lora_model(target_modules=["gate_proj", "model.layers.0.self_attn.o_proj"]))]
    assert names == ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj"]


def test_only_adapter_and_modules_to_save_change_in_training():
    model = lora_model(use_dora=True, target_modules=["q_proj", "down_proj"], modules_to_save=["lm_head"])
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or ".trained." in n for n in trainable)
    opt = torch.optim.AdamW(lora_param_groups(model, lr=1e-2, weight_decay=0.1, loraplus_ratio=4))
    for _ in range(3):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == trainable


def test_disabled_adapter_gives_base_output():
    base_logits = logits(make_tiny_llama())
    model = lora_model(use_dora=True, modules_to_save=["lm_head"])
    randomize_b(model)
    with torch.no_grad():
        model.lm_head.trained.weight.add_(0.1)
    assert (logits(model) - base_logits).abs().max() > 1e-2
    with disable_adapters(model):
        assert torch.equal(logits(model), base_logits)
    assert (logits(model) - base_logits).abs().max() > 1e-2  # enabled again after the block


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_equals_w_plus_scale_ba_and_unmerge_restores(use_dora):
    model = lora_model(use_dora=use_dora, use_rslora=True)
    randomize_b(model)
    adapted_logits = logits(model)
    originals = {p: layer.base.weight.detach().clone() for p, layer in lora_layers(model)}
    expected = {}
    for path, layer in lora_layers(model):  # float64 reference
        W, A, B = (t.detach().double() for t in (layer.base.weight, layer.lora_A.weight, layer.lora_B.weight))
        merged = W + (8 / math.sqrt(4)) * B @ A  # rsLoRA: alpha / sqrt(r)
        if use_dora:
            merged = (layer.lora_magnitude_vector.detach().double() / merged.norm(dim=1))[:, None] * merged
        expected[path] = merged

    merge_adapter(model)
    for path, layer in lora_layers(model):
        assert torch.allclose(layer.base.weight.double(), expected[path], atol=1e-6), path
    assert (logits(model) - adapted_logits).abs().max() <= 1e-5
    unmerge_adapter(model)
    for path, layer in lora_layers(model):
        assert torch.allclose(layer.base.weight, originals[path], atol=1e-6), path
    assert (logits(model) - adapted_logits).abs().max() <= 1e-5


def test_remove_lora_gives_back_the_base_model():
    model = lora_model(modules_to_save=["lm_head"])
    randomize_b(model)
    assert torch.equal(logits(remove_lora(model)), logits(make_tiny_llama()))
    assert not any(isinstance(m, (LoRALinear, ModuleToSave)) for m in model.modules())


def test_merge_lora_returns_plain_linears():
    model = lora_model(use_dora=True, modules_to_save=["lm_head"])
    randomize_b(model)
    adapted_logits = logits(model)
    merged = merge_lora(model)
    assert not any(isinstance(m, (LoRALinear, ModuleToSave)) for m in merged.modules())
    assert isinstance(merged.model.layers[0].self_attn.q_proj, nn.Linear)
    assert not hasattr(merged, "lora_config")
    assert set(merged.state_dict()) == set(make_tiny_llama().state_dict())  # loads as a plain HF model
    assert (logits(merged) - adapted_logits).abs().max() <= 1e-5


def test_loraplus_groups():
    model = lora_model(use_dora=True)
    groups = {g["name"]: g for g in lora_param_groups(model, lr=1e-3, weight_decay=0.01, loraplus_ratio=16)}
    b_weights = {id(layer.lora_B.weight) for _, layer in lora_layers(model)}
    assert {id(p) for p in groups["B"]["params"]} == b_weights
    assert groups["B"]["lr"] == pytest.approx(16e-3) and groups["A"]["lr"] == 1e-3
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["no_decay"]["lr"] == pytest.approx(16e-3)
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups.values()) == n_trainable
    plain = lora_param_groups(model, lr=1e-3)
    assert all(g["lr"] == 1e-3 for g in plain)


# --- save / load ---------------------------------------------------------------------------------------

def test_save_load_round_trip_and_atomic_overwrite(tmp_path):
    model = lora_model(use_dora=True, modules_to_save=["lm_head"])
    randomize_b(model)
    save_adapter(model, tmp_path / "ad")
    save_adapter(model, tmp_path / "ad")  # overwriting an adapter folder is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # no temp folders left
    loaded = load_adapter(make_tiny_llama(), tmp_path / "ad", verbose=False)
    assert (logits(loaded) - logits(model)).abs().max() <= 1e-6
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(TunelabError, match="other than an adapter"):
        save_adapter(model, tmp_path / "other")


# --- bad input -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"r": 0}, "r must be a positive integer"),
    ({"r": -2}, "r must be a positive integer"),
    ({"alpha": 0}, "alpha must be > 0"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"init": "pissa"}, "init must be one of"),
    ({"bias": "all"}, "bias='all' is not supported"),
])
def test_bad_config_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**{"r": 4, "alpha": 8, **kwargs})


@pytest.mark.parametrize("targets, message", [
    (["q_prj"], r"name 'q_prj' matches no module in LlamaForCausalLM; its linear layers are named \[.*'q_proj'"),
    (r"q_proj", r"regex 'q_proj' matches no module"),
    (["self_attn"], r"matches model.layers.0.self_attn \(LlamaAttention\), which is not a linear layer"),
])
def test_bad_targets(targets, message):
    with pytest.raises(TunelabError, match=message):
        lora_model(target_modules=targets)


def test_adapter_for_another_shape_names_module_and_shapes(tmp_path):
    save_adapter(lora_model(target_modules=["down_proj"]), tmp_path)
    wider = make_tiny_llama(intermediate_size=96)
    with pytest.raises(TunelabError) as err:
        load_adapter(wider, tmp_path, verbose=False)
    msg = str(err.value)
    assert "model.layers.0.mlp.down_proj.lora_A.weight has shape (4, 128)" in msg
    assert "expects (4, 96)" in msg and "base linear 96 -> 64" in msg
    # The failed load left the model as it was: no adapter layers, every parameter trainable again.
    assert set(wider.state_dict()) == set(make_tiny_llama(intermediate_size=96).state_dict())
    assert all(p.requires_grad for p in wider.parameters()) and not hasattr(wider, "lora_config")


def test_adapter_keys_matching_no_module(tmp_path):
    save_adapter(lora_model(target_modules=["q_proj"]), tmp_path)
    model = lora_model(target_modules=["v_proj"])  # LoRA layers already there, at other places
    with pytest.raises(TunelabError, match=r"match no LoRA layer .* e\.g\. base_model\.model\.model\.layers\.0\.self_attn\.q_proj"):
        load_adapter(model, tmp_path)


def test_bad_regex_is_a_config_error():
    with pytest.raises(ConfigError, match=r"'q_proj\(' is not a valid regex"):
        LoraConfig(r=4, alpha=8, target_modules="q_proj(")


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("x_grad", [True, False])
def test_fused_forward_backward_equal_the_plain_composition(quantized, x_grad):
    """LoRALinear's fused autograd (scale in the GEMMs, addmm accumulation) == base(x) + s * B(A(x))."""
    from tunelab.accel.lora import fused_forward
    from tunelab.lora.layer import LoRALinear
    from tunelab.quant import Linear4bit

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(48, 40)
    base = Linear4bit.from_linear(lin) if quantized else lin
    layer = LoRALinear(base, r=4, alpha=8)
    layer.kernel = fused_forward  # as tunelab.accel.kernels.apply sets it
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(40, 4, generator=g))
    x = torch.randn(3, 5, 48, generator=g, requires_grad=x_grad)
    y = layer(x)
    assert y.grad_fn is not None and "Fused" in type(y.grad_fn).__name__
    gy = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad(y, [layer.lora_A.weight, layer.lora_B.weight] + ([x] if x_grad else []), gy)

    a, b = (t.detach().clone().requires_grad_() for t in (layer.lora_A.weight, layer.lora_B.weight))
    x_ref = x.detach().clone().requires_grad_(x_grad)
    ref = base(x_ref) + torch.nn.functional.linear(torch.nn.functional.linear(x_ref, a), b) * layer.scale
    ref_grads = torch.autograd.grad(ref, [a, b] + ([x_ref] if x_grad else []), gy)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("base_kind", ["bf16", "fp32", "4bit"])
def test_fused_under_bf16_autocast_equals_float64_within_bf16_rounding(base_kind):
    """Under autocast (CUDA's path, here on CPU) the fused layer runs in bf16 with fp32 adapters, as the
    unfused layers do: output and gradients within bf16 rounding of float64 math on the same bf16-rounded
    operands; A's and B's gradients fp32, x's in x's dtype; closer than the unfused composition's error."""
    from tunelab.accel.lora import fused_forward
    from tunelab.lora.layer import LoRALinear
    from tunelab.quant import Linear4bit

    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(96, 80)
    base = {"bf16": lambda: lin.to(torch.bfloat16), "fp32": lambda: lin,
            "4bit": lambda: Linear4bit.from_linear(lin.to(torch.bfloat16))}[base_kind]()
    layer = LoRALinear(base, r=8, alpha=16)
    layer.kernel = fused_forward
    assert layer.lora_A.weight.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(80, 8, generator=g) * 0.1)
    x = torch.randn(4, 16, 96, generator=g, requires_grad=True)
    gy = torch.randn(4, 16, 80, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert "Fused" in type(y.grad_fn).__name__ and y.dtype == torch.bfloat16
    ga, gb, gx = torch.autograd.grad(y, [layer.lora_A.weight, layer.lora_B.weight, x], gy)
    assert ga.dtype == gb.dtype == gx.dtype == torch.float32

    def bf(t):  # what autocast feeds the matmuls, then float64
        return t.detach().to(torch.bfloat16).double()
    w = bf(base.dequantize_weight(torch.bfloat16) if base_kind == "4bit" else base.weight)
    bias = 0 if base.bias is None else bf(base.bias)
    a, b = bf(layer.lora_A.weight).requires_grad_(), bf(layer.lora_B.weight).requires_grad_()
    xr = bf(x).requires_grad_()
    u = (xr @ a.t()).to(torch.bfloat16).double()  # u is kept in bf16 by both paths
    ref = xr @ w.t() + bias + layer.scale * (u @ b.t())
    ref_ga, ref_gb, ref_gx = torch.autograd.grad(ref, [a, b, xr], gy.double())

    def rel(got, want):
        return float((got.double() - want).norm() / want.norm())
    assert rel(y, ref) < 4e-3
    for got, want in ((ga, ref_ga), (gb, ref_gb), (gx, ref_gx)):
        assert rel(got, want) < 1e-2
    # The unfused composition (PEFT's order of operations) rounds more often: fused is at least as close.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = (base(x) + layer.lora_B(layer.lora_A(x)) * layer.scale)
    assert rel(y, ref) <= rel(plain, ref) * 1.05

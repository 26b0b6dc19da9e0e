"""The device-agnostic training path: bf16 autocast, fp32 adapters over a half-precision base (as PEFT),
gradient checkpointing with LoRA and QLoRA, SDPA attention; CUDA runs of the real CLI (marker cuda)."""

from __future__ import annotations

import math

import peft
import pytest
import torch

from tests.support.numerics import assert_within, gamma, unit_roundoff
from tests.support.tiny_models import make_tiny_llama
from tests.support.tiny_run import losses, make_workspace, run_config
from tunelab.cli import main
from tunelab.lora import LoraConfig, apply_lora
from tunelab.quant import Linear4bit, quantize_model
from tunelab.train.loss import causal_lm_loss_sum
from tunelab.train.run import enable_checkpointing

BATCH = {"input_ids": torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))}
BATCH["labels"] = BATCH["input_ids"].clone()


def _adapted(method: str, dtype=torch.float32, seed: int = 1):
    """A tiny Llama with r=4 adapters on all linears (over 4-bit ones for qlora), B moved off zero."""
    model = make_tiny_llama().to(dtype).train()
    if method == "qlora":
        quantize_model(model, block_size=32)
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"), verbose=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _loss_and_grads(model, batch=BATCH) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    s, n = causal_lm_loss_sum(model, batch)
    (s / n).backward()
    return float(s.detach()) / n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_gradient_checkpointing_gives_the_same_gradients(method):
    """use_reentrant=False (as tunelab/train/run.py): every adapter gets its gradient, equal to no checkpointing."""
    model = _adapted(method)
    loss, grads = _loss_and_grads(model)
    enable_checkpointing(model)
    calls = []  # a pre-hook: the recomputation in backward stops once it has what backward needs (torch's
    # non-reentrant early stop), before the mlp's forward returns
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    loss_ckpt, grads_ckpt = _loss_and_grads(model)
    assert len(calls) == 2  # forward, then again in backward: the layer really is checkpointed
    assert loss_ckpt == loss
    assert grads.keys() == grads_ckpt.keys() and len(grads) == 2 * 7 * 2  # A and B, 7 linears, 2 layers
    for k in grads:
        assert grads[k].abs().sum() > 0, k
        torch.testing.assert_close(grads_ckpt[k], grads[k], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_bf16_autocast_matches_fp32(method):
    """CPU autocast runs the same code as CUDA's bf16 autocast: 4-bit weights dequantize to bf16 there,
    adapters stay fp32, and loss and gradients agree with fp32 to bf16 precision."""
    model = _adapted(method)
    loss, grads = _loss_and_grads(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_bf16, grads_bf16 = _loss_and_grads(model)
        layer = model.model.layers[0].mlp.down_proj
        x = torch.randn(3, layer.base.in_features)
        assert layer(x).dtype == torch.bfloat16 and layer.base(x).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert loss_bf16 == pytest.approx(loss, rel=1e-2) and loss_bf16 != loss
    for k in grads:
        cos = torch.nn.functional.cosine_similarity(grads[k].flatten(), grads_bf16[k].flatten(), dim=0)
        assert cos > 0.98, (k, float(cos))


def test_adapters_over_bf16_base_are_fp32_and_match_peft():
    """PEFT upcasts adapters over a half-precision base to fp32 (autocast_adapter_dtype) and sums in fp32."""
    ours = _adapted("lora", torch.bfloat16)
    ref = peft.get_peft_model(make_tiny_llama().to(torch.bfloat16),
                              peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    theirs = {k.replace("base_model.model.", "").replace(".default", ""): p for k, p in ref.named_parameters()
              if p.requires_grad}
    ours_params = {k.replace(".base", ""): p for k, p in ours.named_parameters() if p.requires_grad}
    assert ours_params.keys() == theirs.keys()
    with torch.no_grad():
        for k, p in ours_params.items():
            assert p.dtype == theirs[k].dtype == torch.float32, k
            theirs[k].copy_(p)
        ids = BATCH["input_ids"]
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_models_load_with_sdpa_attention(tiny_llama):
    """Transformers 5 picks SDPA (flash attention on CUDA for bf16 without a mask) unless told otherwise."""
    assert tiny_llama.config._attn_implementation == "sdpa"


def test_linear4bit_under_autocast_dequantizes_to_bf16():
    layer = Linear4bit.from_linear(torch.nn.Linear(64, 32), block_size=32)
    x = torch.randn(5, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    w = layer.dequantize_weight(torch.bfloat16)
    torch.testing.assert_close(y, torch.nn.functional.linear(x.bfloat16(), w, layer.bias.bfloat16()), rtol=0, atol=0)
    assert x.grad.dtype == torch.float32
    # dy (ones) @ W in bf16: PyTorch's CPU bf16 GEMMs accumulate the 32 products in float32, then round the
    # result to bf16 once: u_bf16 |sum w| + gamma_32 sum |w|
    exact = w.double().sum(0)
    bound = unit_roundoff(torch.bfloat16) * exact.abs() + gamma(32) * w.double().abs().sum(0)
    assert_within(x.grad, exact.expand(5, -1), bound, "bf16 input gradient")


# ---- CUDA: the same CLI run on a GPU (bf16 weights, autocast, checkpointing, Triton dequantize) -------------

# CPU fp32 losses of this run (tests/train/test_train_e2e.py pins them); bf16 on a GPU lands within ~1%.
CPU_LOSSES = {"lora": [6.211736679077148, 6.226012721206203, 6.081261350397478],
              "qlora": [6.211902618408203, 6.221796209161932, 6.080501623320997]}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_cuda_cli_run_tracks_cpu_losses(tmp_path, method, checkpointing):
    ws = make_workspace(tmp_path / "ws", records=96)
    out = tmp_path / "out"
    cfg = run_config(ws, out, method=method, quant={"block_size": 32}, data={"eval_fraction": 0.1},
                     train={"device": "cuda", "gradient_checkpointing": checkpointing})
    assert main(["train", str(cfg), "--no-progress"]) == 0
    got = losses(out)
    assert len(got) == 3 and all(math.isfinite(x) for x in got)
    assert got == pytest.approx(CPU_LOSSES[method], rel=1.5e-2)

"""Linear4bit (frozen 4-bit linear with its own autograd), quantize_model, and bitsandbytes checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tunelab.quant as tq
from tests.support.bnb_reference import dequantize_4bit as bnb_dequantize_4bit
from tests.support.numerics import assert_within, gamma, matmul_error_bound
from tunelab.quant import Linear4bit, QuantizedTensor, model_nbytes, quantize_model


def _linear(i=96, o=40, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(i, o, bias=bias)


def test_forward_equals_float64_math_on_the_dequantized_weight():
    lin = _linear()
    layer = Linear4bit.from_linear(lin, "nf4", block_size=64, double_quant=True)
    x = torch.randn(3, 7, 96)
    w = layer.dequantize_weight().double()
    ref = x.double() @ w.T + lin.bias.double()
    # a 96-term dot product and the bias: gamma_97 (|x| |W|^T + |b|)
    bound = gamma(97) * (x.double().abs() @ w.abs().T + lin.bias.double().abs())
    assert_within(layer(x), ref, bound, "forward against float64")
    assert (layer.in_features, layer.out_features, layer.quant_type, layer.block_size) == (96, 40, "nf4", 64)
    assert not layer.bias.requires_grad


def test_input_gradient_is_correct_and_weight_gets_none():
    lin = _linear()
    layer = Linear4bit.from_linear(lin, "fp4", block_size=32)
    x = torch.randn(5, 96, dtype=torch.float64).float().requires_grad_()
    g = torch.randn(5, 40)
    layer(x).backward(g)
    w = layer.dequantize_weight().double()
    assert_within(x.grad, g.double() @ w, matmul_error_bound(g, w), "input gradient against float64")
    assert layer.bias.grad is None
    assert [p for p in layer.parameters() if p.requires_grad] == []


def test_autograd_saves_only_the_packed_weight(monkeypatch):
    """No tensor of the weight's size in floats is saved; backward re-dequantizes (counted)."""
    layer = Linear4bit.from_linear(_linear(256, 128))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    calls = []
    original = QuantizedTensor.dequantize
    monkeypatch.setattr(QuantizedTensor, "dequantize",
                        lambda self, dtype=None, workspace=None: calls.append(1) or original(self, dtype, workspace))
    x = torch.randn(4, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert len(calls) == 1
    assert not any(t.is_floating_point() and t.numel() >= 128 * 256 for t in saved)
    y.sum().backward()
    assert len(calls) == 2  # W recomputed for the input gradient
    assert x.grad is not None


def test_trainable_bias_gets_its_gradient():
    layer = Linear4bit.from_linear(_linear())
    layer.bias.requires_grad_(True)
    g = torch.randn(6, 40)
    layer(torch.randn(6, 96)).backward(g)
    torch.testing.assert_close(layer.bias.grad, g.sum(0))


def test_compute_dtype_bf16():
    layer = Linear4bit.from_linear(_linear(), compute_dtype=torch.bfloat16)
    x = torch.randn(2, 96)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = x.double() @ layer.dequantize_weight().double().T + layer.bias.double()
    torch.testing.assert_close(y.double(), ref, rtol=0.05, atol=0.05)


def test_state_dict_has_bitsandbytes_keys_and_loads_into_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    lin = _linear()
    layer = Linear4bit.from_linear(lin, "nf4", double_quant=True)
    sd = layer.state_dict()
    ref = bnb.nn.Linear4bit(96, 40, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    ref.load_state_dict(lin.state_dict())
    ref = ref.to("cpu")
    assert list(sd) == list(ref.state_dict())  # same keys, same order
    for k, v in ref.state_dict().items():
        assert torch.equal(sd[k], v), k
    # ours -> bitsandbytes: Params4bit.from_prequantized is how transformers loads such checkpoints
    stats = {k.removeprefix("weight."): v for k, v in sd.items() if k.startswith("weight.")}
    weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu")
    deq = bnb_dequantize_4bit(weight.data, weight.quant_state)
    assert torch.equal(deq, layer.dequantize_weight())


def test_load_state_dict_round_trip_and_errors():
    a = Linear4bit.from_linear(_linear(seed=1))
    b = Linear4bit.from_linear(_linear(seed=2), "fp4", block_size=128, double_quant=False)
    assert b.load_state_dict(a.state_dict()).missing_keys == []
    assert b.quant_type == "nf4" and b.block_size == 64
    assert torch.equal(b.dequantize_weight(), a.dequantize_weight()) and torch.equal(b.bias, a.bias)
    wrong = Linear4bit.from_linear(_linear(64, 40))
    with pytest.raises(RuntimeError, match="shape"):
        wrong.load_state_dict(a.state_dict())
    with pytest.raises(RuntimeError, match="weight"):
        b.load_state_dict({"bias": a.bias})


def test_from_linear_rejects_8bit():
    with pytest.raises(tq.QuantError, match="4-bit"):
        Linear4bit.from_linear(_linear(), "int8")


def test_quantize_model_replaces_linears_and_stays_close(tiny_llama):
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_llama(ids).logits
    before = model_nbytes(tiny_llama)
    model = quantize_model(tiny_llama, "nf4", block_size=64, double_quant=True)
    names = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)
    assert isinstance(model.lm_head, nn.Linear)
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if n != "lm_head")
    with torch.no_grad():
        out = model(ids).logits
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 0.2, rel  # 4-bit noise, not garbage
    after = model_nbytes(model)
    linear_params = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit))
    assert before - after == linear_params * 4 - sum(m.nbytes for m in model.modules() if isinstance(m, Linear4bit))


def test_quantized_model_state_dict_round_trip(tiny_llama):
    from tests.support.tiny_models import make_tiny_llama

    model = quantize_model(tiny_llama)
    other = quantize_model(make_tiny_llama(seed=3))
    assert other.load_state_dict(model.state_dict())  # strict: all keys matched
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert torch.equal(other(ids).logits, model(ids).logits)


def test_module_half_keeps_fp32_scales():
    layer = Linear4bit.from_linear(_linear())
    layer.half()
    assert layer.qweight.scales.dtype == torch.uint8 and layer.qweight.nested_absmax.dtype == torch.float32
    assert layer.bias.dtype == torch.float16


def test_dequantize_speed_is_small_next_to_the_matmul():
    """QLoRA's extra cost per layer is one dequantize: it should not dwarf the layer's own matmul."""
    import time

    layer = Linear4bit.from_linear(_linear(576, 1536))
    x = torch.randn(8 * 256, 576)

    def best(fn, k=5):
        times = []
        for _ in range(k):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    deq = best(layer.dequantize_weight)
    w = layer.dequantize_weight()
    mm = best(lambda: x @ w.T)
    assert deq < 2 * mm, (deq, mm)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_layer_moves_and_matches_cpu():
    layer = Linear4bit.from_linear(_linear())
    x = torch.randn(4, 96)
    ref = layer(x)
    layer.cuda()
    assert layer.weight.is_cuda and layer.qweight.nested_absmax.is_cuda
    torch.testing.assert_close(layer(x.cuda()).cpu(), ref, rtol=1e-5, atol=1e-5)

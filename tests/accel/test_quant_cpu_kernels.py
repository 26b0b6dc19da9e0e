"""The compiled 4-bit dequantize kernel (tunelab.accel.dequant_c, reached through the `dequant` speed-up,
tunelab.accel.dequant) against the PyTorch path (QuantizedTensor.dequantize), bit for bit."""

from __future__ import annotations

import shutil

import pytest
import torch

from tunelab.accel import dequant, dequant_c
from tunelab.quant import blockwise, quantize


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path):
    """An empty kernel cache and no library loaded yet; restores the module's state afterwards."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(dequant_c, "_lib", False)
    return tmp_path


def _both_paths(qt, monkeypatch):
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.fail("this check needs a C compiler, which the test machines have")
    monkeypatch.setattr(dequant_c, "_lib", False)
    fast = dequant.Dequant()(qt, torch.float32).clone()  # the kernel, into a model's reused workspace
    assert dequant_c.available()
    slow = qt.dequantize(torch.float32)  # the reference: PyTorch ops
    return fast, slow


def test_builds_when_a_compiler_exists(fresh_cache):
    has_cc = bool(shutil.which("cc") or shutil.which("gcc"))
    assert dequant_c.available() == has_cc
    assert len(list((fresh_cache / "tunelab" / "kernels").glob("*.so"))) == int(has_cc)


@pytest.mark.parametrize("quant_type,scheme,double_quant", [
    ("nf4", "absmax", False), ("nf4", "absmax", True), ("fp4", "absmax", True),
    ("int4", "absmax", False), ("int4", "minmax", False)])
@pytest.mark.parametrize("shape,block", [((96, 80), 64), ((7, 33), 32), ((1,), 64), ((3, 1001), 4096)])
def test_same_bits_as_the_pytorch_path(monkeypatch, quant_type, scheme, double_quant, shape, block):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.logspace(-3, 2, shape[-1])  # blocks of very different scales
    w.view(-1)[:block] = 0  # an all-zero block
    qt = quantize(w, quant_type, block_size=block, double_quant=double_quant, scheme=scheme)
    fast, slow = _both_paths(qt, monkeypatch)
    assert fast.shape == slow.shape == w.shape
    assert torch.equal(fast.view(torch.int32), slow.view(torch.int32))  # sign of zero included


def test_writes_into_a_workspace_and_not_past_n():
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.fail("this check needs a C compiler, which the test machines have")
    qt = quantize(torch.randn(65), "nf4", block_size=32)  # odd: the last byte holds one value
    buf = torch.full((80,), 7.0)
    out = dequant_c.dequant4(qt.data, blockwise.code_table16("nf4"), buf, 65, 32, qt.scales, qt.zero,
                             qt.nested_absmax, qt.offset)
    assert out.data_ptr() == buf.data_ptr()
    assert torch.equal(buf[65:], torch.full((15,), 7.0))
    assert torch.equal(out, qt.dequantize(torch.float32))


def test_switched_off_or_failing_compiler_falls_back(fresh_cache, monkeypatch):
    from tests.models.test_families import _model
    from tunelab.accel import kernels

    model = _model("llama")
    monkeypatch.setenv("TUNELAB_C_KERNELS", "0")  # read by choose, once: no build is even tried
    k = kernels.choose(model, "auto", "cpu")
    assert not k.dequant and "4-bit dequantize kernel: TUNELAB_C_KERNELS=0" in k.off
    assert not list(fresh_cache.rglob("*.so"))
    monkeypatch.delenv("TUNELAB_C_KERNELS")
    monkeypatch.setenv("CC", shutil.which("false") or "/bin/false")  # a "compiler" that always fails
    assert not dequant_c.available()
    assert not list(fresh_cache.rglob("*.so"))  # nothing half-written left in the cache
    qt = quantize(torch.randn(65), "nf4", block_size=32)
    assert torch.equal(dequant.Dequant()(qt, torch.float32), qt.dequantize(torch.float32))  # PyTorch's path
    qt = quantize(torch.randn(10, 64), "nf4")
    assert torch.equal(qt.dequantize(torch.float32), _reference(qt))


def _reference(qt):
    """float64 formula: code value times the block's scale, rounded to fp32 once."""
    from tunelab.quant import codebooks

    codes = qt.data.long()
    idx = torch.stack([codes >> 4, codes & 15], 1).view(-1)[: qt.numel()]
    scale = qt.block_scales().double().repeat_interleave(qt.block_size)[: qt.numel()]
    return (codebooks.code("nf4").double()[idx] * scale).float().view(qt.shape)


def test_matches_a_float64_formula(monkeypatch):
    torch.manual_seed(1)
    qt = quantize(torch.randn(33, 64), "nf4", double_quant=True)
    fast, _ = _both_paths(qt, monkeypatch)
    assert torch.equal(fast, _reference(qt))


def test_large_tensors_split_across_threads_give_the_same_bits(monkeypatch):
    monkeypatch.setattr(dequant_c, "PARALLEL_MIN", 1000)  # split a small tensor as a large one would be
    torch.manual_seed(2)
    for scheme, quant_type in (("absmax", "nf4"), ("minmax", "int4")):
        # odd count: a ragged last part; 1978 blocks: 8 groups of double-quantized scales across the parts
        qt = quantize(torch.randn(300, 211), quant_type, block_size=32, scheme=scheme,
                      double_quant=scheme == "absmax")
        monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
        fast, slow = _both_paths(qt, monkeypatch)
        assert torch.equal(fast, slow)

"""tunelab.quant against bitsandbytes 0.50 on CPU (bytes, scales, values, state dicts) and its own contracts."""

from __future__ import annotations

import json

import pytest
import torch

import tunelab.quant as tq
from tests.support.bnb_reference import dequantize_4bit as bnb_dequantize_4bit
from tests.support.numerics import assert_within, gamma
from tunelab.quant import QuantError, QuantizedTensor, blockwise

bnbf = pytest.importorskip("bitsandbytes.functional")


@pytest.fixture(autouse=True)
def _eager_bitsandbytes():
    """bitsandbytes torch.compiles its fallback for odd shapes (~10 s a shape); eager gives the same numbers."""
    import torch._dynamo

    old = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = old


def _bnb(x, quant_type, block_size, double_quant):
    return bnbf.quantize_4bit(x, blocksize=block_size, quant_type=quant_type, compress_statistics=double_quant)


def test_code_books_are_bitsandbytes_values_in_bitsandbytes_order():
    for name in ("nf4", "fp4"):
        assert torch.equal(tq.code(name), bnbf.get_4bit_type(name, device="cpu"))
    assert torch.equal(tq.dynamic_map(), bnbf.create_dynamic_map())
    assert torch.equal(tq.code("int4"), torch.arange(-7, 8) / 7.0)
    assert torch.equal(tq.code("int8"), torch.arange(-127, 128) / 127.0)


# Shapes: exact blocks, a short last block, odd element counts (a padded nibble), 1-D, 3-D, and more than
# one 256-scale group for double quantization (several CPU chunks at block 32).
SHAPES = [(64, 64), (3, 5), (7, 33), (1001,), (2, 3, 129), (80, 1024)]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_bitsandbytes_bytes_scales_and_values(quant_type, shape):
    gen = torch.Generator().manual_seed(hash(shape) % 1000)
    for dtype, block_size, double_quant in [(torch.float32, 64, False), (torch.float32, 32, True),
                                            (torch.float16, 128, True), (torch.bfloat16, 256, False),
                                            (torch.float32, 4096, True)]:
        x = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
        packed, state = _bnb(x, quant_type, block_size, double_quant)
        ours = tq.quantize(x, quant_type, block_size=block_size, double_quant=double_quant)
        case = (quant_type, shape, dtype, block_size, double_quant)
        assert torch.equal(ours.data, packed.view(-1)), case
        assert torch.equal(ours.scales, state.absmax), case
        if double_quant:
            assert torch.equal(ours.nested_absmax, state.state2.absmax), case
            assert ours.offset.item() == state.offset.item(), case
        ref = bnb_dequantize_4bit(packed, state).reshape(shape)
        got = ours.dequantize()
        assert got.dtype == dtype and got.shape == x.shape
        torch.testing.assert_close(got.float(), ref.float(), rtol=1e-6, atol=0)
        for out_dtype in (torch.float32, torch.bfloat16):  # dequantize to a requested dtype
            assert ours.dequantize(out_dtype).dtype == out_dtype


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_route_equals_bitsandbytes_where_its_kernel_is_right(double_quant, dtype):
    # bnb_reference takes bitsandbytes' generic path where its AVX-512 CPU kernel is wrong (blocks across
    # rows); on shapes where that kernel is right both must agree bit for bit, nested scales included
    x = (torch.randn(48, 256, generator=torch.Generator().manual_seed(5)) * 0.02).to(dtype)
    packed, state = _bnb(x, "nf4", 64, double_quant)
    assert torch.equal(bnb_dequantize_4bit(packed, state, generic=True), bnbf.dequantize_4bit(packed, state))


def test_long_tensor_with_many_chunks_matches_bitsandbytes(monkeypatch):
    from tunelab.quant import blockwise

    monkeypatch.setattr(blockwise, "CHUNK", 1 << 15)  # 10 CPU steps, the last one short
    x = torch.randn(300_001, generator=torch.Generator().manual_seed(1))
    for quant_type in ("nf4", "fp4"):
        packed, state = _bnb(x, quant_type, 64, True)
        ours = tq.quantize(x, quant_type, double_quant=True)
        assert torch.equal(ours.data, packed.view(-1)) and torch.equal(ours.scales, state.absmax)
        ref = bnb_dequantize_4bit(packed, state).view(-1)
        assert torch.equal(ours.dequantize(), ref)
        assert torch.equal(ours.dequantize(torch.bfloat16), ref.bfloat16())  # converting copy per step
    half = x.bfloat16()  # fp16/bf16 input: widened per step
    packed, state = _bnb(half, "nf4", 64, False)
    assert torch.equal(tq.quantize(half, "nf4").data, packed.view(-1))


def test_edge_values_match_bitsandbytes():
    """Zero blocks (absmax 0), exact code values and midpoints, tiny and huge magnitudes."""
    nf4 = tq.code("nf4")
    mids = (nf4[:-1] + nf4[1:]) / 2
    pieces = [torch.zeros(64), nf4.repeat(4), mids.repeat(4)[:64], torch.full((64,), 1e-30),
              torch.tensor([1e30, -1e30] * 32), torch.linspace(-1, 1, 64), torch.zeros(3)]
    x = torch.cat(pieces)
    for quant_type in ("nf4", "fp4"):
        for dq in (False, True):
            packed, state = _bnb(x, quant_type, 64, dq)
            ours = tq.quantize(x, quant_type, double_quant=dq)
            assert torch.equal(ours.data, packed.view(-1)) and torch.equal(ours.scales, state.absmax)
            assert torch.equal(ours.dequantize(), bnb_dequantize_4bit(packed, state).view(-1))


def test_nibble_order_is_high_then_low():
    x = torch.tensor([-1.0, 1.0])  # NF4 codes 0 and 15
    assert tq.quantize(x, "nf4").data.tolist() == [0x0F]


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_round_trips_both_ways(double_quant):
    from bitsandbytes.functional import QuantState

    x = torch.randn(96, 80, generator=torch.Generator().manual_seed(2))
    ours = tq.quantize(x, "nf4", double_quant=double_quant)
    sd = ours.to_bnb_state_dict("layer.")
    expected = {"layer.weight", "layer.weight.absmax", "layer.weight.quant_map", "layer.weight.quant_state.bitsandbytes__nf4"}
    if double_quant:
        expected |= {"layer.weight.nested_absmax", "layer.weight.nested_quant_map"}
    assert set(sd) == expected
    # ours -> bitsandbytes: its QuantState reads our keys and dequantizes to our values
    state = QuantState.from_dict({k.removeprefix("layer.weight."): v for k, v in sd.items() if k != "layer.weight"},
                                 device=torch.device("cpu"))
    assert torch.equal(bnb_dequantize_4bit(sd["layer.weight"], state), ours.dequantize())
    # bitsandbytes -> ours: its as_dict(packed=True) is byte-identical, JSON included, and reads back
    packed, bstate = _bnb(x, "nf4", 64, double_quant)
    theirs = {"layer.weight": packed, **{"layer.weight." + k: v for k, v in bstate.as_dict(packed=True).items()}}
    assert set(theirs) == set(sd)
    for k in sd:
        assert torch.equal(sd[k], theirs[k]), k
    back = QuantizedTensor.from_bnb_state_dict(theirs, "layer.")
    assert back.shape == x.shape and back.double_quant == double_quant
    assert torch.equal(back.dequantize(), ours.dequantize())


def test_bitsandbytes_linear4bit_checkpoint_loads():
    import bitsandbytes as bnb

    lin = torch.nn.Linear(128, 48)
    layer = bnb.nn.Linear4bit(128, 48, compute_dtype=torch.float32, compress_statistics=True, quant_type="fp4")
    layer.load_state_dict(lin.state_dict())
    layer = layer.to("cpu")  # quantizes
    sd = layer.state_dict()
    ours = QuantizedTensor.from_bnb_state_dict(sd)
    assert ours.quant_type == "fp4" and ours.shape == (48, 128)
    assert torch.equal(ours.dequantize(), bnb_dequantize_4bit(layer.weight.data, layer.weight.quant_state))


def test_bad_state_dict_is_a_clear_error():
    with pytest.raises(QuantError, match="no bitsandbytes 4-bit weight"):
        QuantizedTensor.from_bnb_state_dict({"x.weight": torch.zeros(2)}, "x.")
    with pytest.raises(QuantError, match="nf4/fp4"):
        tq.quantize(torch.randn(64), "int8").to_bnb_state_dict()


def test_bits_per_parameter_and_exact_byte_size():
    x = torch.randn(256, 4096)
    qt = tq.quantize(x, "nf4", block_size=64, double_quant=True)
    blocks = x.numel() // 64
    assert qt.nbytes == x.numel() // 2 + blocks + (blocks // 256) * 4 + 4
    assert round(qt.bits_per_param, 3) == 4.127
    assert tq.quantize(x, "nf4").bits_per_param == 4.5  # 4 + 32/64
    assert tq.quantize(x, "int8", scheme="minmax").bits_per_param == 9.0  # 8 + (32 + 32)/64
    odd = tq.quantize(torch.randn(3, 5), "nf4")
    assert odd.nbytes == 8 + 4  # ceil(15/2) bytes of codes, one fp32 absmax


def test_worked_minmax_int8_example():
    """The classic 8-bit example: min -50, max 100, scale 150/255; -20 -> 51, -10 -> 68, 0 -> 85."""
    x = torch.tensor([-20.0, -10.0, 0.0, -50.0, 100.0])
    qt = tq.quantize(x, "int8", scheme="minmax")
    assert qt.data.tolist() == [51, 68, 85, 0, 255]
    assert qt.scales.item() == pytest.approx(150 / 255, rel=1e-7) and qt.zero.item() == -50.0
    x64 = x.double()
    codes = torch.round((x64 + 50) / (150 / 255))
    expected = codes * (150 / 255) - 50
    # float32: the scale's own rounding, the product's and the sum's: gamma_3 (|q s| + |zero|)
    assert_within(qt.dequantize(), expected, gamma(3) * (codes * (150 / 255) + 50), "int8 minmax dequantize")


def test_minmax_int4_packs_and_constant_blocks_are_exact():
    x = torch.cat([torch.full((64,), 3.25), torch.linspace(-1, 2, 63)])
    qt = tq.quantize(x, "int4", scheme="minmax")
    assert qt.data.numel() == 64  # 127 codes -> 64 bytes
    deq = qt.dequantize()
    assert torch.equal(deq[:64], x[:64])
    assert (deq[64:] - x[64:]).abs().max() <= qt.scales[1] / 2 * (1 + 1e-5)


def test_int_absmax_codes_are_rounded_multiples():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    qt = tq.quantize(x, "int8")
    scale = x.view(-1, 64).abs().amax(1, keepdim=True).double()
    expected = torch.round(x.view(-1, 64).double() / scale * 127) / 127 * scale
    # float32: the stored absmax, a divide and a multiply in some order, each rounding once: gamma_3 |value|
    assert_within(qt.dequantize().view(-1, 64), expected, gamma(3) * expected.abs(), "int8 absmax dequantize")


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.arange(64),), "float32/float16/bfloat16"),
        ((torch.randn(64).double(),), "float32/float16/bfloat16"),
        ((torch.randn(64), "nf4", 48), "power of two"),
        ((torch.randn(64), "nf4", 16), "power of two"),
        ((torch.randn(64), "nf4", 8192), "power of two"),
        ((torch.empty(0, 4),), "empty"),
        ((torch.randn(64), "nf3"), "unknown quant_type"),
    ],
)
def test_bad_input_is_a_clear_error(args, match):
    with pytest.raises(QuantError, match=match):
        tq.quantize(*args)


def test_minmax_needs_a_linear_code():
    with pytest.raises(QuantError, match="min-max"):
        tq.quantize(torch.randn(64), "nf4", scheme="minmax")


def test_quantize_is_a_tunelab_error_for_the_cli():
    from tunelab.errors import TunelabError

    assert issubclass(QuantError, TunelabError) and issubclass(QuantError, ValueError)


def test_dequantize_default_dtype_and_device_move():
    x = torch.randn(10, 64, dtype=torch.bfloat16)
    qt = tq.quantize(x, "nf4", double_quant=True)
    assert qt.dequantize().dtype == torch.bfloat16 and qt.dtype == torch.bfloat16
    assert qt.to("cpu") is qt
    assert json.loads(bytes(qt.to_bnb_state_dict()["weight.quant_state.bitsandbytes__nf4"].tolist()))["dtype"] == "bfloat16"


def test_nested_codes_follow_bitsandbytes_8bit_kernel_on_many_values():
    """Double quantization = bitsandbytes' quantize_blockwise(absmax - mean, blocksize=256), code for code."""
    scales = torch.rand(200_000, generator=torch.Generator().manual_seed(4)) * 0.1
    codes, nested, offset = blockwise.quantize_nested(scales)
    ref, state = bnbf.quantize_blockwise(scales - scales.mean(), blocksize=256)
    assert torch.equal(codes, ref) and torch.equal(nested, state.absmax) and offset == scales.mean()
    torch.testing.assert_close(blockwise.dequantize_nested(codes, nested, offset),
                               bnbf.dequantize_blockwise(ref, state) + offset, rtol=1e-6, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    x = torch.randn(1000, 333, generator=torch.Generator().manual_seed(5))
    for quant_type in ("nf4", "fp4"):
        cpu = tq.quantize(x, quant_type)
        gpu = tq.quantize(x.cuda(), quant_type)
        assert torch.equal(gpu.data.cpu(), cpu.data) and torch.equal(gpu.scales.cpu(), cpu.scales)
        assert torch.equal(gpu.dequantize().cpu(), cpu.dequantize())
        dq = tq.quantize(x.cuda(), quant_type, double_quant=True)
        torch.testing.assert_close(dq.dequantize().cpu(), tq.quantize(x, quant_type, double_quant=True).dequantize(),
                                   rtol=0, atol=1e-3 * float(x.abs().max()))


def test_double_quant_of_scales_whose_mean_overflows_is_a_quant_error():
    """Block maxima near float32's limit (found by tests/project/test_fuzz.py): their mean is inf, so the nested codes
    would index outside the look-up table; the quantizer says so in a QuantError, and without double
    quantization the same tensor round-trips."""
    from tunelab.quant import quantize

    t = torch.full((128,), 3e38)
    t[::2] = -3e38
    with pytest.raises(QuantError, match="mean overflows float32"):
        quantize(t, "nf4", block_size=64, double_quant=True)
    assert torch.equal(quantize(t, "nf4", block_size=64, double_quant=False).dequantize(), t)

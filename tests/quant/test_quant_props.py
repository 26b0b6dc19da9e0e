"""Property tests: round-trip error bounds of every code book and scheme, and NaN/Inf rejection."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tunelab.quant as tq
from tunelab.quant import QuantError

BLOCKS = st.sampled_from([32, 64, 128, 256])
FLOAT_DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def tensors(draw, max_len=700):
    """Float tensors of awkward lengths: mixed magnitudes, repeated values, zeros, short last blocks."""
    n = draw(st.integers(1, max_len))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    magnitude = draw(st.sampled_from([1e-6, 1e-2, 1.0, 1e3]))
    x = torch.randn(n, generator=gen, dtype=torch.float64) * magnitude
    kind = draw(st.sampled_from(["normal", "zeros", "rounded", "spiky"]))
    if kind == "zeros":
        x[torch.rand(n, generator=gen) < 0.5] = 0
    elif kind == "rounded":
        x = torch.round(x / magnitude * 4) * magnitude / 4  # many ties and equal values
    elif kind == "spiky":
        x[torch.randint(0, n, (max(n // 50, 1),), generator=gen)] *= 100
    dtype = draw(FLOAT_DTYPES)
    return x.clamp(-6e4, 6e4).to(dtype)  # finite in fp16 too


def _per_block(values: torch.Tensor, block_size: int, n: int) -> torch.Tensor:
    """Expand a per-block vector to one value per element (float64)."""
    return values.double().repeat_interleave(block_size)[:n]


def _max_gap(quant_type: str) -> float:
    code = tq.code(quant_type).double().sort().values
    return float((code[1:] - code[:-1]).max())


@SETTINGS
@given(x=tensors(), quant_type=st.sampled_from(["nf4", "fp4", "int4", "int8"]), block_size=BLOCKS,
       double_quant=st.booleans())
def test_absmax_error_is_at_most_half_the_widest_code_gap(x, quant_type, block_size, double_quant):
    """|x - dq(q(x))| <= scale * (largest gap between neighbouring codes) / 2, per element.

    With double quantization the scale itself is approximate: the bound uses the stored (dequantized) scale
    and adds |true scale - stored scale| (a code value is at most 1 in magnitude).
    """
    qt = tq.quantize(x, quant_type, block_size=block_size, double_quant=double_quant)
    n = x.numel()
    xd = x.double().view(-1)
    got = qt.dequantize(torch.float64).view(-1)
    true_scale = _per_block(tq.quantize(x, quant_type, block_size=block_size).scales, block_size, n)
    stored = _per_block(qt.block_scales(), block_size, n)
    bound = stored * _max_gap(quant_type) / 2 + (stored - true_scale).abs()
    # fp32 arithmetic of x / scale and code * scale: a few ulps of the scale
    slack = 4 * torch.finfo(torch.float32).eps * (stored.abs() + true_scale)
    assert bool(((got - xd).abs() <= bound + slack).all())


@SETTINGS
@given(x=tensors(), block_size=BLOCKS)
def test_minmax_int8_error_is_at_most_half_a_step(x, block_size):
    qt = tq.quantize(x, "int8", block_size=block_size, scheme="minmax")
    n = x.numel()
    step = _per_block(qt.scales, block_size, n)
    err = (qt.dequantize(torch.float64).view(-1) - x.double().view(-1)).abs()
    span = step * 255
    assert bool((err <= step / 2 + 8 * torch.finfo(torch.float32).eps * (span + x.double().abs().view(-1))).all())


@SETTINGS
@given(x=tensors(max_len=200), bad=st.sampled_from([math.nan, math.inf, -math.inf]),
       quant_type=st.sampled_from(["nf4", "fp4", "int4", "int8"]), scheme=st.sampled_from(["absmax", "minmax"]),
       where=st.floats(0, 1, exclude_max=True))
def test_nan_or_inf_input_is_a_clear_error(x, bad, quant_type, scheme, where):
    if scheme == "minmax" and quant_type in ("nf4", "fp4"):
        scheme = "absmax"
    x = x.clone()
    x.view(-1)[int(where * x.numel())] = bad
    with pytest.raises(QuantError, match="NaN or Inf"):
        tq.quantize(x, quant_type, scheme=scheme)


@SETTINGS
@given(x=tensors(), quant_type=st.sampled_from(["nf4", "fp4"]), block_size=BLOCKS, double_quant=st.booleans())
def test_state_dict_round_trip_is_lossless(x, quant_type, block_size, double_quant):
    qt = tq.quantize(x, quant_type, block_size=block_size, double_quant=double_quant)
    back = tq.QuantizedTensor.from_bnb_state_dict(qt.to_bnb_state_dict("m."), "m.")
    assert back.dtype == qt.dtype and back.shape == qt.shape and back.nbytes == qt.nbytes
    assert torch.equal(back.dequantize(), qt.dequantize())

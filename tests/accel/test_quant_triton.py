"""The Triton 4-bit dequantize kernel: exact against the PyTorch path (CPU, Triton's interpreter) and
against bitsandbytes on a GPU (marker cuda)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tunelab.quant as tq

pytest.importorskip("triton")  # an optional dependency: without it the PyTorch path serves CUDA too

CASES_SCRIPT = Path(__file__).parents[1] / "support" / "triton_interp_cases.py"


@pytest.fixture(scope="module")
def interpreted():
    """The kernel run on CPU by Triton's interpreter, one subprocess for all cases (see the script)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(CASES_SCRIPT)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_interpreted_kernel_equals_pytorch_path_bit_for_bit(interpreted):
    from tests.support.triton_interp_cases import CASES

    bf16 = sum(c[5] == torch.bfloat16 for c in CASES)
    assert len(interpreted) == 2 * (len(CASES) + 1) - (len(CASES) - bf16)  # bf16 cases + ties: both kernels
    assert sum("per-byte" in r["case"] for r in interpreted) == bf16 + 1
    bad = [r for r in interpreted if not r["equal"]]
    assert not bad, bad
    assert interpreted[2]["numel"] == 7 and interpreted[0]["numel"] == 600 * 64 + 37  # odd counts, not padded


def test_kernel_serves_only_cuda_4bit_absmax():
    from tunelab.accel import dequant_triton

    w = torch.randn(64, 64)
    assert not dequant_triton.serves(tq.quantize(w, "nf4"))  # CPU: the PyTorch path
    if torch.cuda.is_available():
        assert dequant_triton.serves(tq.quantize(w.cuda(), "fp4", double_quant=True))
        assert not dequant_triton.serves(tq.quantize(w.cuda(), "int8"))
        assert not dequant_triton.serves(tq.quantize(w.cuda(), "int4", scheme="minmax"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_cuda_kernel_equals_bitsandbytes(quant_type, double_quant):
    """Codes and state from bitsandbytes' CUDA quantize; our kernel and its dequantize give the same values."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    from tunelab.accel import dequant_triton

    assert dequant_triton.AVAILABLE
    gen = torch.Generator().manual_seed(7)
    for shape, block in (((4096, 1000), 64), ((333, 129), 128), ((1, 4097), 64)):
        w = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16).cuda()
        packed, state = bnbf.quantize_4bit(w, blocksize=block, quant_type=quant_type,
                                           compress_statistics=double_quant)
        sd = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
        qt = tq.QuantizedTensor.from_bnb_state_dict(sd)
        assert dequant_triton.serves(qt)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            state.dtype = dtype
            ref = bnbf.dequantize_4bit(packed, state)
            ours = qt.dequantize(dtype)
            assert ours.shape == ref.shape and ours.dtype == ref.dtype
            diff = (ours.float() - ref.float()).abs().max().item()
            assert torch.equal(ours, ref), f"{shape} block {block} {dtype}: max |diff| {diff}"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_kernel_equals_pytorch_path_and_fills_workspace():
    from tunelab.quant import blockwise

    w = torch.randn(1000, 333, generator=torch.Generator().manual_seed(8)).cuda()
    qt = tq.quantize(w, "nf4", block_size=64, double_quant=True)
    ref = blockwise.dequantize_blocks(qt.data, "nf4", qt.numel(), 64, qt.block_scales, None, torch.bfloat16)
    from tunelab.accel import dequant

    speedup = dequant.Dequant()  # the `dequant` speed-up of one model: Triton, into its workspace
    work = speedup.workspace(qt, torch.bfloat16)
    ours = speedup(qt, torch.bfloat16)
    assert ours.data_ptr() == work.data_ptr()
    assert torch.equal(ours.reshape(-1), ref)


def test_a_failing_triton_dequantize_warns_once_and_the_pytorch_path_takes_over(monkeypatch):
    """As the fused Triton kernels do: one warning naming the failure, the same numbers from PyTorch's path,
    and the kernel not tried again for this model (stand-ins for a CUDA tensor and a broken kernel)."""
    from tunelab.accel import dequant, dequant_triton

    qt = tq.quantize(torch.randn(8, 64), "nf4", double_quant=True)
    want = qt.dequantize(torch.float32)
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("no sm_120 in this Triton")

    monkeypatch.setattr(dequant, "_triton_for", lambda qt: dequant_triton)  # as for a CUDA tensor
    monkeypatch.setattr(dequant_triton, "dequantize_4bit", broken)
    speedup = dequant.Dequant()
    with pytest.warns(UserWarning, match="Triton dequantize kernel failed .*no sm_120"):
        got = speedup(qt, torch.float32)
    assert torch.equal(got, want) and dequant.TRITON in speedup.guard.failed
    speedup(qt, torch.float32)
    assert calls == [1]

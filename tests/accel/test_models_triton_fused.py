"""The Triton RMSNorm and SwiGLU kernels against the PyTorch formulas: on CPU under Triton's interpreter
(tests/support/triton_fused_cases.py, in a subprocess) and on a GPU at Llama sizes (marker cuda).

Tolerances. Forward, against the formula in the same dtypes: fp32 max |diff| <= 1e-5 * max |ref|; a bf16 or
fp16 output within 1 ulp of it (the kernels round as PyTorch does, only a sum's order or an exp may differ);
an fp32 output from bf16 x (fp32 weight) within 1 bf16 ulp of x * rstd, |diff| <= 2^-7 |ref| per element.
Gradients, against autograd on the formula in float64 from the same inputs: ||ours - ref|| / ||ref|| at
most 1e-5 in fp32 and 2e-2 in bf16 or fp16.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")  # an optional dependency: without it PyTorch's ops serve CUDA too

CASES_SCRIPT = Path(__file__).parents[1] / "support" / "triton_fused_cases.py"
FP32 = "torch.float32"


@pytest.fixture(scope="module")
def interpreted():
    """Every case run on CPU by Triton's interpreter, one subprocess for all (see the script)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(CASES_SCRIPT)], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def forward_ok(r: dict, gpu: bool = False) -> bool:
    """The tolerances of the module docstring; on a GPU a bf16 output may also be off by 1e-2 * max |ref|
    (rsqrt and exp are approximations there, in PyTorch's kernels and in Triton's)."""
    if not r["shape_ok"] or r["out_dtype"] != r["ref_dtype"]:
        return False
    if r["out_dtype"] != FP32:
        return r["max_ulps"] <= 1 or (gpu and r["rel"] <= 1e-2)
    if r["x_dtype"] == FP32:
        return r["rel"] <= 1e-5
    return r["elem_rel"] <= 2**-7 * 1.001


def grads_ok(r: dict) -> bool:
    """Gradient tolerances, and each gradient in its input's dtype (dx: x's, dw: weight's, dg and du: g's)."""
    tol = 1e-5 if r["x_dtype"] == FP32 and r["w_dtype"] in (None, FP32) else 2e-2
    want = {"dx": r["x_dtype"], "dw": r["w_dtype"], "dg": r["x_dtype"], "du": r["x_dtype"]}
    return (all(v <= tol for v in r["grads"].values())
            and all(d == want[k] for k, d in r["grad_dtypes"].items()))


def test_interpreted_cases_all_ran(interpreted):
    from tests.support.triton_fused_cases import RMS_CASES, SWIGLU_CASES

    assert len(interpreted) == len(RMS_CASES) + 2 + len(SWIGLU_CASES)  # + strided x, + weight without grad
    no_dw = [r for r in interpreted if "dw" not in r["grads"] and r["op"] == "rms_norm"]
    assert len(no_dw) == 1 and no_dw[0]["grad_dtypes"] == {"dx": FP32}


@pytest.mark.parametrize("op", ["rms_norm", "swiglu"])
def test_interpreted_forward_matches_pytorch_formula(interpreted, op):
    rows = [r for r in interpreted if r["op"] == op]
    bad = [r for r in rows if not forward_ok(r)]
    assert rows and not bad, bad
    # bf16 outputs round exactly as PyTorch does (by hand in the kernel: the interpreter truncates)
    assert all(r["exact"] for r in rows if r["out_dtype"] == "torch.bfloat16"), rows


@pytest.mark.parametrize("op", ["rms_norm", "swiglu"])
def test_interpreted_grads_match_float64_autograd(interpreted, op):
    rows = [r for r in interpreted if r["op"] == op]
    bad = [r for r in rows if not grads_ok(r)]
    assert rows and not bad, bad


def test_serves_only_cuda_and_imports_without_triton():
    from tunelab.accel import triton_fused

    x, w = torch.randn(4, 64), torch.ones(64)
    assert not triton_fused.serves(x, w)  # CPU: PyTorch's ops
    script = ("import importlib, sys\n"
              "import tunelab.accel.triton_fused as m\n"
              "assert m.triton is not None and m.AVAILABLE  # TUNELAB_TRITON=0: read by kernels.choose only\n"
              "sys.modules['triton'] = sys.modules['triton.language'] = None  # as if not installed\n"
              "m = importlib.reload(m)\n"
              "assert m.triton is None and not m.AVAILABLE and not m.serves(__import__('torch').ones(2))\n")
    root = str(Path(__file__).parents[2])
    env = {**os.environ, "TUNELAB_TRITON": "0", "PYTHONPATH": root}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=root,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_kernels_match_pytorch_at_llama_sizes():
    """rms_norm over 4096 rows of 4096, swiglu over 4096 x 14336 (Llama-3-8B's MLP), bf16 on the GPU."""
    from tests.support.triton_fused_cases import run_rms_case, run_swiglu_case
    from tunelab.accel import triton_fused

    assert triton_fused.AVAILABLE
    assert "Interpreted" not in type(triton_fused._swiglu_fwd).__name__, "TRITON_INTERPRET was set on import"
    x, w = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16), torch.ones(4096, device="cuda")
    assert triton_fused.serves(x, w.bfloat16()) and triton_fused.serves(x, x)
    assert not triton_fused.serves(x, w) and not triton_fused.serves(x, w[:100].bfloat16())
    results = [run_rms_case((4096,), 4096, torch.bfloat16, torch.bfloat16, device="cuda"),
               run_rms_case((4096,), 4096, torch.bfloat16, torch.float32, device="cuda"),
               run_rms_case((2, 1000), 5120, torch.float32, torch.float32, device="cuda"),
               run_swiglu_case((4096, 14336), torch.bfloat16, device="cuda"),
               run_swiglu_case((3, 1001), torch.float32, device="cuda")]
    bad = [r for r in results if not (forward_ok(r, gpu=True) and grads_ok(r))]
    assert not bad, bad

"""Run tunelab's Triton RMSNorm and SwiGLU kernels and compare them with the PyTorch formulas.

Run as a script (tests/accel/test_models_triton_fused.py does, in a subprocess), it runs every case on CPU under
Triton's interpreter: TRITON_INTERPRET must be set before Triton is imported, and a pytest process may already
have imported it. It prints one JSON list of case results (see `compare`). Imported, it only defines the
cases and the comparisons (the CUDA test runs them on a GPU); importing it sets no environment variable.
"""

import json
import os
import sys

import torch

# rms_norm: rows give the leading shape (33 rows as (3, 11)); (x dtype, weight dtype) pairs.
RMS_SHAPES = {1: (1,), 7: (7,), 33: (3, 11)}
RMS_CASES = [(lead, n, xd, wd) for n in (64, 100, 576, 4096) for lead in RMS_SHAPES.values()
             for xd, wd in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                            (torch.bfloat16, torch.float32))]
RMS_CASES += [((5,), 96, torch.float16, torch.float16)]
SWIGLU_CASES = [(shape, dt) for shape in ((1,), (10, 100), (5000,)) for dt in (torch.float32, torch.bfloat16)]
SWIGLU_CASES += [((10, 100), torch.float16)]
EPS = 1e-6


def llama_rms_norm(x, weight, eps):
    """transformers' LlamaRMSNorm forward, the reference."""
    h = x.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    return weight * h.to(x.dtype)


def float64_rms_norm(x, weight, eps):
    """The same formula with no rounding at all (inputs as float64), for the gradients."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """Floats as integers in the order of their values, so that a difference counts ulps."""
    bits = t.view({2: torch.int16, 4: torch.int32}[t.element_size()]).long()
    return torch.where(bits < 0, -(bits & (1 << (8 * t.element_size() - 1)) - 1), bits)


def compare(ours: torch.Tensor, ref: torch.Tensor, ours_grads, ref_grads) -> dict:
    """Forward: `exact`, `max_ulps` (in the output dtype), `rel` (max |diff| / max |ref|), `elem_rel`
    (max |diff| / |ref| over elements); gradients: ||ours - ref|| / ||ref|| each, with their dtypes."""
    diff, b = (ours.double() - ref.double()).abs(), ref.double().abs()
    return {"out_dtype": str(ours.dtype), "ref_dtype": str(ref.dtype), "shape_ok": ours.shape == ref.shape,
            "exact": torch.equal(ours, ref),
            "max_ulps": (_ordered(ours) - _ordered(ref)).abs().max().item() if ours.dtype == ref.dtype else None,
            "rel": (diff.max() / b.max().clamp_min(1e-30)).item(),
            "elem_rel": torch.where(diff == 0, 0.0, diff / b).max().item(),
            "grads": {k: (ours_grads[k].double() - ref_grads[k].double()).norm().item()
                      / max(ref_grads[k].double().norm().item(), 1e-30) for k in ours_grads},
            "grad_dtypes": {k: str(ours_grads[k].dtype) for k in ours_grads}}


def run_rms_case(lead, n, xdtype, wdtype, device="cpu", contiguous=True, w_grad=True) -> dict:
    from tunelab.accel import triton_fused

    gen = torch.Generator().manual_seed(n + len(lead))
    x = (torch.randn(*lead, n + (0 if contiguous else 3), generator=gen) * 3 + 0.5)[..., :n].to(device, xdtype)
    w = (1 + 0.2 * torch.randn(n, generator=gen)).to(device, wdtype)
    dy = torch.randn(*lead, n, generator=gen).to(device, torch.promote_types(xdtype, wdtype))
    leaves = {"dx": x.requires_grad_()} | ({"dw": w.requires_grad_()} if w_grad else {})
    ours = triton_fused.rms_norm(x, w, EPS)
    grads = dict(zip(leaves, torch.autograd.grad(ours, list(leaves.values()), dy)))
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref_grads = dict(zip(["dx", "dw"], torch.autograd.grad(float64_rms_norm(x64, w64, EPS), (x64, w64),
                                                           dy.double())))
    with torch.no_grad():
        ref = llama_rms_norm(x, w, EPS)
    name = f"rms_norm {tuple(lead)}x{n} x {xdtype} w {wdtype}" + ("" if contiguous else " strided")
    return {"case": name, "op": "rms_norm", "x_dtype": str(xdtype), "w_dtype": str(wdtype),
            **compare(ours.detach(), ref, grads, {k: ref_grads[k] for k in grads})}


def run_swiglu_case(shape, dtype, device="cpu") -> dict:
    from tunelab.accel import triton_fused

    gen = torch.Generator().manual_seed(sum(shape))
    g = (torch.randn(shape, generator=gen) * 4).to(device, dtype).requires_grad_()  # reaches sigmoid's flat ends
    u = torch.randn(shape, generator=gen).to(device, dtype).requires_grad_()
    dh = torch.randn(shape, generator=gen).to(device, dtype)
    ours = triton_fused.swiglu(g, u)
    grads = dict(zip(["dg", "du"], torch.autograd.grad(ours, (g, u), dh)))
    g64, u64 = g.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    ref_grads = dict(zip(["dg", "du"], torch.autograd.grad(torch.nn.functional.silu(g64) * u64, (g64, u64),
                                                           dh.double())))
    with torch.no_grad():
        ref = torch.nn.functional.silu(g) * u
    return {"case": f"swiglu {tuple(shape)} {dtype}", "op": "swiglu", "x_dtype": str(dtype), "w_dtype": None,
            **compare(ours.detach(), ref, grads, ref_grads)}


if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))  # the checkout's tunelab
    results = [run_rms_case(*c) for c in RMS_CASES]
    results.append(run_rms_case((7,), 100, torch.bfloat16, torch.bfloat16, contiguous=False))
    results.append(run_rms_case((7,), 100, torch.float32, torch.float32, w_grad=False))
    results += [run_swiglu_case(*c) for c in SWIGLU_CASES]
    print(json.dumps(results))

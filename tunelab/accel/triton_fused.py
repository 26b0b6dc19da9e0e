"""RMSNorm and SwiGLU as Triton kernels, forward and backward, for training on CUDA (bf16 most of all).

Each op is one torch.autograd.Function around one forward and one backward kernel. They compute in fp32 and
round as the PyTorch formulas they replace round, so outputs match them bit for bit but where a sum's order
or an exp or rsqrt approximation moves the last bit:
  rms_norm: transformers' LlamaRMSNorm, weight * (x * rsqrt(mean(x^2, -1) + eps)).to(x.dtype), the product
            in PyTorch's promoted dtype (bf16 * bf16 -> bf16, fp32 weight with bf16 x -> fp32). It keeps x and
            one fp32 1/rms per row for the backward; autograd keeps x in fp32 and x * rstd as well.
  swiglu:   silu(g) * u, silu rounded to the input dtype first as PyTorch does. It keeps g and u only, not
            silu(g): one (tokens, intermediate) tensor less per layer; the backward recomputes the sigmoid.
Gradients are computed in fp32 without the forward's intermediate roundings and rounded once at the end.

Rounding to bf16 is done by hand (round to nearest even on the fp32 bits, then an exact cast): Triton's CPU
interpreter truncates fp32 -> bf16, and the few integer ops cost nothing on a GPU where these kernels are
memory bound; on a GPU `.to(tl.bfloat16)` would round the same. (NaNs with payload only in the low 16 bits
may come out as inf; arithmetic never makes those.)

Without Triton, `AVAILABLE` is False and the module still imports; TUNELAB_TRITON=0 turns the kernels off
through train.kernels (tunelab.accel.kernels.choose reads it).
Tests run them on CPU tensors under Triton's interpreter (tests/support/triton_fused_cases.py).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # callers keep PyTorch's ops
    triton = None

# a fact of the installation, never changed; a kernel that fails at run time is turned off per model by its
# Guard (tunelab.accel.guard), and TUNELAB_TRITON=0 is read by tunelab.accel.kernels.choose
AVAILABLE = triton is not None
MAX_N = 65536  # longest rms_norm row: one program holds a whole row in registers
SWIGLU_BLOCK = 2048  # elements per program: 16 per thread at 4 warps
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def serves(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take these tensors (x, weight of rms_norm, or g, u of swiglu): Triton on, all
    non-empty CUDA tensors of one dtype in DTYPES, with one last-dimension size of at most MAX_N."""
    t0 = tensors[0]
    return (AVAILABLE and t0.dim() >= 1 and 0 < t0.shape[-1] <= MAX_N
            and all(t.device == t0.device and t.device.type == "cuda" and t.dtype == t0.dtype and t.numel() > 0
                    and t.dim() >= 1 and t.shape[-1] == t0.shape[-1] for t in tensors)
            and t0.dtype in DTYPES)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm's forward, weight * (x * rsqrt(mean(x^2, -1) + eps)).to(x.dtype), as two kernels."""
    return _RMSNorm.apply(x, weight, eps)


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u for g and u of one shape and dtype, as two kernels; keeps g and u for the backward."""
    return _SwiGLU.apply(g, u)


if triton is not None:

    @triton.jit
    def _cast(v, dtype: tl.constexpr):
        """fp32 `v` in `dtype`, rounded to nearest even (by hand for bf16, see the module docstring)."""
        if dtype == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            v = (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)
        return v.to(dtype)

    @triton.jit
    def _rms_norm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, n, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        x = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n + eps)
        h = _cast(x * rstd, x_ptr.dtype.element_ty).to(tl.float32)  # h.to(x.dtype)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * n + cols, _cast(w * h, y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _rms_norm_bwd(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, rows, n,
                      BLOCK: tl.constexpr, ROWS: tl.constexpr, W_GRAD: tl.constexpr):
        """dx for this program's ROWS rows in a row, and their fp32 partial sum of dw."""
        pid = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in range(ROWS):  # the last program's rows past the end: x = dy = 0
            row = pid * ROWS + i
            in_row = cols < tl.where(row < rows, n, 0)  # (mask & scalar fails in Triton's interpreter)
            x = tl.load(x_ptr + row * n + cols, mask=in_row, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * n + cols, mask=in_row, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + tl.minimum(row, rows - 1))  # any finite value past the end
            xhat, g = x * rstd, dy * w
            dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / n))
            tl.store(dx_ptr + row * n + cols, _cast(dx, dx_ptr.dtype.element_ty), mask=in_row)
            if W_GRAD:
                dw += dy * xhat
        if W_GRAD:
            tl.store(dw_ptr + pid * n + cols, dw, mask=mask)

    @triton.jit
    def _swiglu_fwd(g_ptr, u_ptr, h_ptr, numel, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < numel
        g = tl.load(g_ptr + i, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + i, mask=mask, other=0.0).to(tl.float32)
        s = _cast(g / (1.0 + tl.exp(-g)), h_ptr.dtype.element_ty).to(tl.float32)  # PyTorch's SiLU, rounded
        tl.store(h_ptr + i, _cast(s * u, h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, numel, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < numel
        dh = tl.load(dh_ptr + i, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + i, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + i, mask=mask, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-g))
        tl.store(du_ptr + i, _cast(dh * (g * sig), du_ptr.dtype.element_ty), mask=mask)
        dg = (dh * u) * sig * (1.0 + g * (1.0 - sig))  # PyTorch's silu_backward
        tl.store(dg_ptr + i, _cast(dg, dg_ptr.dtype.element_ty), mask=mask)


def _row_launch(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of n values: the whole row in one block, 4 to 16 warps."""
    block = triton.next_power_of_2(n)
    return block, min(max(block // 512, 4), 16)


def _bwd_programs(rows: int, device: torch.device) -> int:
    """Programs for the rms_norm backward: a few per SM on a GPU, each a partial dw of n fp32 values."""
    per_device = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return min(rows, per_device)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        if triton is None:
            raise RuntimeError("tunelab.accel.triton_fused needs Triton; check AVAILABLE first")
        shape, n = x.shape, x.shape[-1]
        x2, weight = x.reshape(-1, n).contiguous(), weight.contiguous()
        y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)  # (rows,) 1 / rms
        block, warps = _row_launch(n)
        _rms_norm_fwd[(x2.shape[0],)](x2, weight, y, rstd, n, eps, BLOCK=block, num_warps=warps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        (rows, n), w_grad = x2.shape, ctx.needs_input_grad[1]
        dy2, dx = dy.reshape(rows, n).contiguous(), torch.empty_like(x2)
        per = triton.next_power_of_2(triton.cdiv(rows, _bwd_programs(rows, x2.device)))  # few compiles
        programs = triton.cdiv(rows, per)
        dw = torch.empty((programs, n) if w_grad else (1,), dtype=torch.float32, device=x2.device)
        block, warps = _row_launch(n)
        _rms_norm_bwd[(programs,)](dy2, x2, weight, rstd, dx, dw, rows, n, BLOCK=block, ROWS=per, W_GRAD=w_grad,
                                   num_warps=warps)
        return dx.view(ctx.shape), dw.sum(0).to(weight.dtype) if w_grad else None, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u):
        if triton is None:
            raise RuntimeError("tunelab.accel.triton_fused needs Triton; check AVAILABLE first")
        g, u = g.contiguous(), u.contiguous()
        h = torch.empty_like(g)
        _swiglu_fwd[(triton.cdiv(g.numel(), SWIGLU_BLOCK),)](g, u, h, g.numel(), BLOCK=SWIGLU_BLOCK)
        ctx.save_for_backward(g, u)
        return h

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        dg, du = torch.empty_like(g), torch.empty_like(u)
        _swiglu_bwd[(triton.cdiv(g.numel(), SWIGLU_BLOCK),)](dh.contiguous(), g, u, dg, du, g.numel(),
                                                             BLOCK=SWIGLU_BLOCK)
        return dg, du

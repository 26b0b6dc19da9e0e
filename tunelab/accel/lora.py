"""LoRA's fused autograd: the speed-up `fused_lora` of tunelab.accel.kernels, set per LoRALinear instance
(`layer.kernel = fused_forward`); its reference twin is LoRALinear's own forward, base(x) + scale * B(A(x))."""

from __future__ import annotations

import torch
from torch import nn

from tunelab.lora.layer import LoRALinear


def fused_forward(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor | None:
    """The layer's output through _FusedLoRA, or None where it does not apply (DoRA, dropout, mixed dtypes):
    LoRALinear then runs its own forward."""
    dtype = _fused_dtype(layer, x)
    if dtype is None:
        return None
    return _FusedLoRA.apply(x, layer.lora_A.weight, layer.lora_B.weight, layer.base, layer.scale, dtype)


def _fused_dtype(layer: LoRALinear, x: torch.Tensor) -> torch.dtype | None:
    """The dtype _FusedLoRA computes in, or None where it does not apply (DoRA, dropout).

    Under autocast: autocast's dtype (bf16 on CUDA), as the unfused layers' matmuls would run, over a
    base of any float dtype. Without: only when x, the base and the adapter share one dtype.
    """
    if layer.use_dora or layer.dropout is not None:
        return None
    base, device = layer.base, x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        if isinstance(base, nn.Linear) or base.compute_dtype in (None, dtype):
            return dtype
        return None
    dtype = base.weight.dtype if isinstance(base, nn.Linear) else base.compute_dtype or x.dtype
    return dtype if x.dtype == dtype == layer.lora_A.weight.dtype else None


def _dense_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The frozen base weight (out, in) in `dtype` for one matmul: the parameter itself (cast if it is
    another dtype, as autocast would), or the 4-bit weight de-quantized as its layer does for its own
    matmul (through that layer's dequantize speed-up when it has one: then valid until the next one)."""
    if isinstance(base, nn.Linear):
        return base.weight.to(dtype)
    return base.matmul_weight(dtype)


class _FusedLoRA(torch.autograd.Function):
    """y = x W^T + b + scale * (x A^T) B^T for a frozen base, in two GEMMs plus one accumulating GEMM.

    The usual composition (base(x) + B(A(x)) * scale) spends two extra passes over the (tokens, out)
    output in forward (the scale and the add) and two in backward (scaling the gradient, adding the
    input gradients); here `scale` rides in the GEMMs' alpha and the second product accumulates into the
    first (addmm). Saves x (a view, as any linear does), u = x A^T (tokens, r), and nothing of W: over a
    4-bit base, W is de-quantized again in backward, as tunelab.quant.Linear4bit does.

    Every product runs in `dtype` with autocast off inside: under bf16 autocast x, A, B (fp32 adapters)
    and W are cast to bf16 as autocast casts them for the unfused layers, and A's and B's gradients come
    back in their own dtype. The sum is rounded once (the unfused layers round B's output, its scaling and
    the sum: three times).
    """

    @staticmethod
    def forward(ctx, x, a, b, base, scale, dtype):
        ctx.ab_dtypes = (a.dtype, b.dtype)  # the gradients go back in these
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # (T, in)
            w = _dense_weight(base, dtype)  # (out, in)
            out = x2 @ w.t() if base.bias is None else torch.addmm(base.bias.to(dtype), x2, w.t())
            a, b = a.to(dtype), b.to(dtype)  # kept for backward: no second cast there (small: r rows)
            u = x2 @ a.t()  # (T, r)
            out.addmm_(u, b.t(), alpha=scale)
        ctx.save_for_backward(x2, u, a, b)
        ctx.base, ctx.scale, ctx.shape, ctx.dtype, ctx.x_dtype = base, scale, x.shape, dtype, x.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, u, a, b = ctx.saved_tensors
        dtype = ctx.dtype
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1]).to(dtype)  # (T, out)
            v = g @ b  # (T, r)
            grad_x = grad_a = grad_b = None
            if ctx.needs_input_grad[0]:
                grad_x = g @ _dense_weight(ctx.base, dtype)  # (T, in)
                grad_x.addmm_(v, a, alpha=ctx.scale)
                grad_x = grad_x.view(ctx.shape).to(ctx.x_dtype)
            if ctx.needs_input_grad[1]:
                grad_a = torch.mm(v.t(), x2).to(ctx.ab_dtypes[0]).mul_(ctx.scale)  # (r, in)
            if ctx.needs_input_grad[2]:
                grad_b = torch.mm(g.t(), u).to(ctx.ab_dtypes[1]).mul_(ctx.scale)  # (out, r)
        return grad_x, grad_a, grad_b, None, None, None

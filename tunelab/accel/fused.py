"""RMSNorm, SwiGLU and the rotary embedding as one C loop forward and one backward each, for fp32 training
on CPU.

transformers' LlamaRMSNorm runs pow, mean, add, rsqrt and two multiplies, each a pass over memory, and
autograd keeps their intermediates for a backward of about ten more ops. The bundled model runs 61 of them a
training step (two per decoder layer and the final norm). Here the forward reads x once to sum its squares
and once to write y, and keeps x and one number per row (1 / rms); the backward reads x and dy once each.
On a LoRA step of the bundled model at batch 4 x 256 that is 75 ms against at least 96 ms, under 1% of the
step, and 5% less peak memory; a full fine-tune's norms keep x * rsqrt no more (docs/lora.md).

The MLP's SiLU(gate) * up keeps the gate output, the SiLU output and the up output for its backward; the
fused SwiGLU keeps gate and up only and recomputes the sigmoid in its one backward pass: one (tokens,
intermediate) fp32 tensor less per layer, 180 MiB of a LoRA step of the bundled model at batch 4 x 256.

The rotary embedding (x * cos + rotate_half(x) * sin on q and k) is six ops forward in transformers (two
slices, a negation, a cat, two products and a sum) and more in backward; in a profiled LoRA step of the
bundled model at batch 4 x 256 they took over 100 ms, one loop each way 45 ms (same bits; docs/lora.md).

`fuse(model)` (what `tunelab train` applies with train.kernels=auto, tunelab.accel.kernels) routes the
rotary embedding of Llama-formula attention modules through the kernel (fuse_rotary) and gives each RMSNorm
and MLP module of Llama's formula (the family table, tunelab.models.families, names them) a subclass
whose forward calls the kernel on fp32 CPU input outside autocast, tunelab.accel.triton_fused's
Triton kernels on CUDA input (bf16 under autocast, the same roundings as the module's formula), and the
module's own formula otherwise. Only the given model's modules change (their class, in place; no function
of transformers is replaced). Weights, state_dict keys and saved files are unchanged. The C kernels are
built by tunelab.accel.ckernels; without a C compiler, and without CUDA and Triton, every module keeps its own
forward (train.kernels=auto does not fuse them then, nor with TUNELAB_C_KERNELS=0 / TUNELAB_TRITON=0).
"""

from __future__ import annotations

import ctypes
import inspect
import threading
import types
from functools import cache

import torch
from torch import nn

from tunelab.accel import ckernels
from tunelab.accel.guard import Guard

SOURCE = r"""
#include <stdint.h>
#include <math.h>

/* Rows [r0, r1) of x (rows x n): y = w * (x * r), r = 1 / sqrt(mean(x^2) + eps), kept in rstd[row].
   The same products and order as transformers' LlamaRMSNorm; the sum of squares is vectorised. */
void tunelab_rms_fwd(const float *x, const float *w, float *y, float *rstd, int64_t r0, int64_t r1,
                     int64_t n, float eps) {
    for (int64_t i = r0; i < r1; i++) {
        const float *xi = x + i * n;
        float *yi = y + i * n, ss = 0.0f;
#pragma omp simd reduction(+:ss)
        for (int64_t j = 0; j < n; j++) ss += xi[j] * xi[j];
        float r = 1.0f / sqrtf(ss / (float)n + eps);
        rstd[i] = r;
#pragma omp simd
        for (int64_t j = 0; j < n; j++) yi[j] = w[j] * (xi[j] * r);
    }
}

/* With g = w * dy: dx = r * g - x * r^3 * sum(g * x) / n; dw += dy * (x * r) summed over the rows.
   dx or dw may be NULL (not needed). */
void tunelab_rms_bwd(const float *dy, const float *x, const float *w, const float *rstd, float *dx, float *dw,
                     int64_t r0, int64_t r1, int64_t n) {
    for (int64_t i = r0; i < r1; i++) {
        const float *xi = x + i * n, *gi = dy + i * n;
        float r = rstd[i];
        if (dx) {
            float *di = dx + i * n, dot = 0.0f;
#pragma omp simd reduction(+:dot)
            for (int64_t j = 0; j < n; j++) dot += (gi[j] * w[j]) * xi[j];
            float c = r * r * r * (dot / (float)n);
#pragma omp simd
            for (int64_t j = 0; j < n; j++) di[j] = r * (gi[j] * w[j]) - xi[j] * c;
        }
        if (dw) {
#pragma omp simd
            for (int64_t j = 0; j < n; j++) dw[j] += gi[j] * (xi[j] * r);
        }
    }
}

/* SwiGLU over values [a, b): h = silu(g) * u, silu(g) = g / (1 + exp(-g)) as PyTorch's SiLU computes it.
   On x86-64 glibc, expf vectorises through glibc's libmvec (its vector variants, declared as math.h does
   under -ffast-math, which we do not use; -fno-math-errno -lm). */
#if defined(__GLIBC__) && defined(__x86_64__)
float expf(float) __attribute__((simd("notinbranch")));
#endif
void tunelab_swiglu_fwd(const float *g, const float *u, float *h, int64_t a, int64_t b) {
#pragma omp simd
    for (int64_t i = a; i < b; i++) h[i] = (g[i] / (1.0f + expf(-g[i]))) * u[i];
}

/* dg = (dh * u) * s * (1 + g * (1 - s)) with s = sigmoid(g) (PyTorch's silu_backward), du = dh * (g * s). */
void tunelab_swiglu_bwd(const float *g, const float *u, const float *dh, float *dg, float *du, int64_t a,
                        int64_t b) {
#pragma omp simd
    for (int64_t i = a; i < b; i++) {
        float e = expf(-g[i]), s = 1.0f / (1.0f + e);
        dg[i] = (dh[i] * u[i]) * (s * (1.0f + g[i] * (1.0f - s)));
        du[i] = dh[i] * (g[i] * s);
    }
}

/* Rotary embedding of the rows of x (..., D), enumerated as (b, i, j) with i < n1, j < n2 (row r0 up to r1),
   at element offset b * sb + i * s1 + j * s2 (the last dimension contiguous); out has x's strides. cos and
   sin of a row sit at b * cb + i * c1 + j * c2 (0 for the head dimension, and for b when one row of cos
   serves every batch row). The caller orders (i, j) as x lies in memory: (head, time) or (time, head).
   Forward: out = x * c + rotate_half(x) * s with rotate_half(x) = cat(-x2, x1), transformers' products
   and order. Backward (bwd = 1, x = dy): its transpose, out = x * c + cat(x2 * s2, -(x1 * s1)), the sums
   autograd forms through rotate_half. */
void tunelab_rope(const float *x, float *out, const float *cs, const float *sn, int64_t r0, int64_t r1,
                  int64_t n1, int64_t n2, int64_t D, int64_t sb, int64_t s1, int64_t s2, int64_t cb, int64_t c1,
                  int64_t c2, int bwd) {
    int64_t d2 = D / 2, j = r0 % n2, i = (r0 / n2) % n1, b = r0 / (n1 * n2);
    for (int64_t r = r0; r < r1; r++) {
        int64_t o = b * sb + i * s1 + j * s2, co = b * cb + i * c1 + j * c2;
        const float *xi = x + o, *c = cs + co, *s = sn + co;
        float *oi = out + o;
        if (!bwd) {
#pragma omp simd
            for (int64_t k = 0; k < d2; k++) {
                float lo = xi[k], hi = xi[k + d2];
                oi[k] = lo * c[k] + (-hi) * s[k];
                oi[k + d2] = hi * c[k + d2] + lo * s[k + d2];
            }
        } else {
#pragma omp simd
            for (int64_t k = 0; k < d2; k++) {
                float lo = xi[k], hi = xi[k + d2];
                oi[k] = lo * c[k] + hi * s[k + d2];
                oi[k + d2] = hi * c[k + d2] + (-(lo * s[k]));
            }
        }
        if (++j == n2) {
            j = 0;
            if (++i == n1) {
                i = 0;
                b++;
            }
        }
    }
}
"""
_SIGNATURES = {
    "tunelab_rms_fwd": [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_float],
    "tunelab_rms_bwd": [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 3,
    "tunelab_swiglu_fwd": [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2,
    "tunelab_swiglu_bwd": [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2,
    "tunelab_rope": [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 11 + [ctypes.c_int],
}
PARALLEL_MIN = 1 << 22  # values per thread below which one thread does all (a thread hand-off costs ~50 us)
SWIGLU_PARALLEL_MIN = 1 << 17  # the same for SwiGLU, whose exp makes each value dearer
_lock = threading.Lock()
# process-wide: the compiled library, loaded once (a build per process, cached on disk by tunelab.accel.ckernels)
_lib: ctypes.CDLL | None | bool = False  # False: not tried yet; None: unavailable


def available() -> bool:
    """Whether the compiled kernel can be used in this process (builds it on the first call)."""
    global _lib
    with _lock:
        if _lib is False:
            _lib = ckernels.load("fused", SOURCE, _SIGNATURES, extra=("-fno-math-errno", "-lm"))
    return _lib is not None


def _row_parts(rows: int, n: int) -> list[tuple[int, int]]:
    """[r0, r1) row ranges: one for small inputs, one per torch thread above PARALLEL_MIN values each."""
    parts = max(1, min(torch.get_num_threads(), rows * n // PARALLEL_MIN))
    step = -(-rows // parts)
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def _each(parts: list[tuple[int, int]], call) -> None:
    """call(k, r0, r1) for each part; on torch's thread count of pool threads when there are several."""
    if len(parts) == 1:
        call(0, *parts[0])
    else:
        list(ckernels.pool(len(parts)).map(lambda k: call(k, *parts[k]), range(len(parts))))


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        n = x.shape[-1]
        x = x.contiguous()  # (..., n)
        rows = x.numel() // n
        y = torch.empty_like(x)
        rstd = torch.empty(rows, dtype=torch.float32)  # (rows,) 1 / rms per row, for the backward
        _each(_row_parts(rows, n), lambda k, r0, r1: _lib.tunelab_rms_fwd(
            x.data_ptr(), weight.data_ptr(), y.data_ptr(), rstd.data_ptr(), r0, r1, n, eps))
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        n = x.shape[-1]
        rows = x.numel() // n
        dy = dy.contiguous()
        dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        parts = _row_parts(rows, n)
        dw = torch.zeros(len(parts), n, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        _each(parts, lambda k, r0, r1: _lib.tunelab_rms_bwd(
            dy.data_ptr(), x.data_ptr(), weight.data_ptr(), rstd.data_ptr(), None if dx is None else dx.data_ptr(),
            None if dw is None else dw[k].data_ptr(), r0, r1, n))
        return dx, None if dw is None else dw.sum(0), None


class _SwiGLU(torch.autograd.Function):
    """silu(g) * u in one pass; keeps g and u (not silu(g)), one (tokens, intermediate) tensor less than
    SiLU and the product keep between them."""

    @staticmethod
    def forward(ctx, g, u):
        g, u = g.contiguous(), u.contiguous()
        h = torch.empty_like(g)
        _each(_value_parts(g.numel()), lambda k, a, b: _lib.tunelab_swiglu_fwd(
            g.data_ptr(), u.data_ptr(), h.data_ptr(), a, b))
        ctx.save_for_backward(g, u)
        return h

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        dh = dh.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        _each(_value_parts(g.numel()), lambda k, a, b: _lib.tunelab_swiglu_bwd(
            g.data_ptr(), u.data_ptr(), dh.data_ptr(), dg.data_ptr(), du.data_ptr(), a, b))
        return dg, du


class _Rotary(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin for x (B, H, T, D) in one pass each way; keeps only cos and sin."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope(x, cos, sin, 0)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rope(dy, cos, sin, 1), None, None


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bwd: int) -> torch.Tensor:
    """The kernel's output, in x's strides where they are dense (a transposed (B, T, H, D) view stays
    one: transformers' q and k), else contiguous."""
    out = torch.empty_like(x)
    if out.stride() != x.stride() or x.stride(-1) != 1:
        x = x.contiguous()
        out = torch.empty_like(x)
    B, H, T, D = x.shape
    sb, sh, st = x.stride()[:3]
    cb, ct = (0 if cos.shape[0] == 1 else cos.stride(0)), cos.stride(1)
    # rows in memory order: a transposed (B, T, H, D) view goes time-major
    n1, n2, s1, s2, c1, c2 = (H, T, sh, st, 0, ct) if sh >= st else (T, H, st, sh, ct, 0)
    _each(_row_parts(B * H * T, D), lambda k, r0, r1: _lib.tunelab_rope(
        x.data_ptr(), out.data_ptr(), cos.data_ptr(), sin.data_ptr(), r0, r1, n1, n2, D, sb, s1, s2, cb, c1, c2,
        bwd))
    return out


def _rotary_fusable(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """x (B, H, T, D) and cos, sin (1 or B, T, D), fp32 on CPU, cos's last dimension contiguous, no gradient
    through cos and sin (transformers computes them from a buffer), kernel available."""
    return (x.dim() == 4 and cos.dim() == 3 and cos.shape == sin.shape and cos.stride() == sin.stride()
            and cos.shape[1:] == x.shape[2:] and cos.shape[0] in (1, x.shape[0]) and x.shape[-1] % 2 == 0
            and cos.stride(-1) == 1 and x.numel() > 0
            and not (cos.requires_grad or sin.requires_grad) and _cpu_fp32(x, cos, sin))


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kernel: bool = True) -> torch.Tensor:
    """transformers' rotary embedding of x (B, H, T, D) with cos, sin (1 or B, T, D): through the kernel
    where it serves and `kernel` allows (the same bits), else the formula."""
    if kernel and _rotary_fusable(x, cos, sin):
        return _Rotary.apply(x, cos, sin)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _fused_apply_rotary(original):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        plain = not args and kwargs.get("unsqueeze_dim", 1) == 1 and len(kwargs) <= 1  # transformers' own call
        if plain and _rotary_fusable(q, cos, sin) and _rotary_fusable(k, cos, sin):
            return _Rotary.apply(q, cos, sin), _Rotary.apply(k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.tunelab_original = original
    apply_rotary_pos_emb.__doc__ = original.__doc__
    return apply_rotary_pos_emb


def _value_parts(n: int) -> list[tuple[int, int]]:
    """[a, b) value ranges for SwiGLU: one per torch thread above SWIGLU_PARALLEL_MIN values each."""
    parts = max(1, min(torch.get_num_threads(), n // SWIGLU_PARALLEL_MIN))
    step = -(-n // parts)
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u through the kernel; fp32 CPU tensors of one shape, kernel available."""
    return _SwiGLU.apply(g, u)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2, -1) + eps)) through the kernel; fp32 CPU tensors, kernel available."""
    return _RMSNorm.apply(x, weight, eps)


def fusable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """fp32 on CPU outside autocast, a contiguous weight of the last dimension's size, and the kernel built."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.device.type == "cpu" and weight.is_contiguous() and weight.dim() == 1
            and x.dim() >= 1 and x.shape[-1] == weight.numel() and x.numel() > 0
            and not torch.is_autocast_enabled("cpu") and available())


def _cpu_fp32(*ts: torch.Tensor) -> bool:
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in ts)
            and not torch.is_autocast_enabled("cpu") and available())


def _gpu(*ts: torch.Tensor):
    """tunelab.accel.triton_fused when its Triton kernels serve these CUDA tensors, else None."""
    if ts[0].device.type != "cuda":
        return None
    from tunelab.accel import triton_fused

    return triton_fused if triton_fused.serves(*ts) else None


TRITON = "fused Triton kernels"  # the name under which the module's Guard turns both off when one fails


def _norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if fusable(hidden_states, self.weight):
        return rms_norm(hidden_states, self.weight, float(self.variance_epsilon))
    gpu = _gpu(hidden_states, self.weight)
    plain = lambda: super(type(self), self).forward(hidden_states)  # noqa: E731
    if gpu is not None:  # a failing kernel: train.kernels' policy (the model's Guard, set by fuse)
        return self.accel_guard.run(TRITON, lambda: gpu.rms_norm(hidden_states, self.weight,
                                                                 float(self.variance_epsilon)), plain)
    return plain()


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    g, u = self.gate_proj(x), self.up_proj(x)  # LlamaMLP's order
    if g.shape == u.shape and g.numel() and _cpu_fp32(g, u):
        return self.down_proj(swiglu(g, u))
    gpu = _gpu(g, u) if g.shape == u.shape else None
    if gpu is not None:
        return self.down_proj(self.accel_guard.run(TRITON, lambda: gpu.swiglu(g, u), lambda: self.act_fn(g) * u))
    return self.down_proj(self.act_fn(g) * u)


def gpu_kernels() -> bool:
    """Whether the Triton kernels of tunelab.accel.triton_fused can serve this process (a CUDA device)."""
    if not torch.cuda.is_available():
        return False
    from tunelab.accel import triton_fused

    return triton_fused.AVAILABLE


@cache  # process-wide: one class per (class, forward), so models fused apart share it and pickle by its name
def _fused_class(cls: type, forward) -> type:
    fused = type(f"Fused{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__,
                                                  "__doc__": f"{cls.__name__} with tunelab's fused CPU kernel."})
    globals()[fused.__name__] = fused  # found by name, so copy and pickle treat it as any class
    return fused


def fuse(model: nn.Module, norm: bool = True, swiglu: bool = True, rotary: bool = True,
         guard: Guard | None = None) -> int:
    """fuse_rmsnorm, fuse_swiglu and fuse_rotary, each where asked: what `tunelab train` does to a model of a
    family in tunelab.models.families with train.kernels=auto (tunelab.accel.kernels); returns how many
    modules. `guard`: what a failing Triton kernel does (tunelab.accel.guard; default a new one, auto)."""
    guard = guard or Guard()
    return ((fuse_rmsnorm(model, guard) if norm else 0) + (fuse_swiglu(model, guard) if swiglu else 0)
            + (fuse_rotary(model) if rotary else 0))


def _family_class(model: nn.Module, field: str) -> type | None:
    """The class the family table names in `field` (norm, mlp, attention) for this model, or None."""
    from tunelab.models.families import family_of, module_class

    family = family_of(getattr(model, "config", None))
    return None if family is None else module_class(model, getattr(family, field))


def fuse_rotary(model: nn.Module) -> int:
    """Route the rotary embedding of every attention module whose family's apply_rotary_pos_emb is Llama's
    (the table's `attention` class) through the C kernel; returns how many modules. Each module gets, in
    place, a subclass whose forward is the attention's own (the same code) reading apply_rotary_pos_emb
    from a copy of its modeling module's globals in which that name is the kernel's router (on fp32 CPU
    tensors the kernel, the same bits; on anything else the original). transformers' modules are not
    touched: other models in the process, and other modules of this one, run transformers' own function."""
    cls = _family_class(model, "attention")
    if not available() or cls is None or "apply_rotary_pos_emb" not in inspect.unwrap(cls.forward).__globals__:
        return 0
    count = 0
    for module in model.modules():
        if type(module) is cls or getattr(type(module), "tunelab_rotary_of", None) is cls:
            module.__class__ = _rotary_class(cls)
            count += 1
    return count


@cache  # process-wide, as _fused_class
def _rotary_class(cls: type) -> type:
    """cls with its forward's code run against globals whose apply_rotary_pos_emb is the kernel's router.

    The forward is taken from under its decorators (inspect.unwrap): the `kernels` package wraps
    transformers' attention forward to route apply_rotary_pos_emb to a kernel from the Hugging Face hub
    once `kernelize` is called, which tunelab never does; without that the wrapper calls the same code."""
    inner = inspect.unwrap(cls.forward)
    scope = dict(inner.__globals__)  # a copy: the modeling module keeps its own function
    scope["apply_rotary_pos_emb"] = _fused_apply_rotary(scope["apply_rotary_pos_emb"])
    forward = types.FunctionType(inner.__code__, scope, inner.__name__, inner.__defaults__, inner.__closure__)
    forward.__kwdefaults__, forward.__qualname__, forward.__doc__ = inner.__kwdefaults__, inner.__qualname__, inner.__doc__
    fused = _fused_class(cls, forward)
    fused.tunelab_rotary_of = cls
    return fused


def fuse_swiglu(model: nn.Module, guard: Guard | None = None) -> int:
    """Give every MLP of LlamaMLP's formula (the family table's `mlp` class) whose activation is SiLU the
    fused SwiGLU; returns how many. Changed in place (the class), as fuse_rmsnorm does."""
    guard = guard or Guard()
    cls = _family_class(model, "mlp")
    if not (available() or gpu_kernels()) or cls is None:
        return 0
    count = 0
    for module in model.modules():
        if type(module) is cls and type(getattr(module, "act_fn", None)).__name__ in ("SiLUActivation", "SiLU"):
            module.__class__ = _fused_class(cls, _mlp_forward)
            module.accel_guard = guard
            count += 1
    return count


def fuse_rmsnorm(model: nn.Module, guard: Guard | None = None) -> int:
    """Give every RMSNorm of Llama's formula (the family table's `norm` class) the fused forward; returns how
    many.

    Nothing changes where the kernel cannot be built; a module is changed in place (its class), so
    parameters, hooks and state_dict keys stay as they were. `guard`: as for fuse."""
    guard = guard or Guard()
    cls = _family_class(model, "norm")
    if not (available() or gpu_kernels()) or cls is None:
        return 0
    count = 0
    for module in model.modules():
        if type(module) is cls and hasattr(module, "variance_epsilon"):
            module.__class__ = _fused_class(cls, _norm_forward)
            module.accel_guard = guard
            count += 1
    return count

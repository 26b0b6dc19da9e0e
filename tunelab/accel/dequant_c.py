"""A C kernel for 4-bit dequantization on CPU, built with the system's C compiler on first use.

PyTorch has no single op for "look up each nibble in a 16-entry code book and scale by its block", so
the PyTorch path (blockwise.unpack_values + _scale_) runs a byte-table gather, then a scaling pass: on
SmolLM2-135M's 1536 x 576 MLP weights about 6x the time of copying the same fp32 output
(benchmarks/lora_floor_probe.py). QLoRA de-quantizes every weight twice per training step, so this is
most of its overhead over LoRA. The kernel below does both in one pass and gives the same bits (one fp32
product, no fused multiply-add: -ffp-contract=off).

The shared library is compiled on first use (0.8 s with gcc here) by tunelab.accel.ckernels. Without a compiler
`dequant4()` returns None and tunelab.accel.dequant takes the PyTorch path; train.kernels (and
TUNELAB_C_KERNELS=0 through it) decides whether a model's 4-bit layers use it at all.
"""

from __future__ import annotations

import ctypes
import threading
from functools import cache

import torch

from tunelab.accel import ckernels
from tunelab.quant import codebooks
from tunelab.quant.blockwise import NESTED_BLOCK

SOURCE = r"""
#include <stdint.h>
#ifdef __AVX2__
#include <immintrin.h>

/* 16 values from 8 packed bytes: the nibbles in value order (high first), looked up in the 16-entry
   table (two 8-lane permutes, bit 3 picks the half), times s (+ z). Same rounding as the scalar code. */
static inline void eight_bytes(const uint8_t *c, float *o, __m256 lo8, __m256 hi8, __m256 s, __m256 z, int add) {
    __m128i b = _mm_loadl_epi64((const __m128i *)c);
    __m128i m = _mm_set1_epi8(15);
    __m128i nib = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
    for (int h = 0; h < 2; h++) {
        __m256i idx = _mm256_cvtepu8_epi32(h ? _mm_srli_si128(nib, 8) : nib);
        __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo8, idx), _mm256_permutevar8x32_ps(hi8, idx),
                                    _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
        v = _mm256_mul_ps(v, s);
        if (add) v = _mm256_add_ps(v, z);
        _mm256_storeu_ps(o + 8 * h, v);
    }
}
#endif

/* Values [first, first + n) of a blockwise 4-bit tensor; byte i of `codes` holds value 2i (high nibble)
   and 2i+1 (low nibble); first is a multiple of block (even), so every block covers whole bytes.
   out[j] = table[code_j] * scale(j / block)  (+ zero[j / block] when zero is not NULL), where
   scale(B) = scales[B], or with double quantization (scode not NULL) smap[scode[B]] * nested[B / 256] + offset,
   bitsandbytes' order. Every product and sum is one fp32 rounding, as in the PyTorch path. */
static inline float scale_of(int64_t B, const float *scales, const uint8_t *scode, const float *smap,
                             const float *nested, float offset) {
    if (!scode) return scales[B];
    float s = smap[scode[B]] * nested[B / 256];
    return s + offset;
}

void tunelab_dequant4(const uint8_t *codes, const float *table, const float *scales, const float *zero,
                      const uint8_t *scode, const float *smap, const float *nested, float offset,
                      float *out, int64_t first, int64_t n, int64_t block) {
    float pairs[512];
    for (int k = 0; k < 256; k++) {
        pairs[2 * k] = table[k >> 4];
        pairs[2 * k + 1] = table[k & 15];
    }
#ifdef __AVX2__
    __m256 lo8 = _mm256_loadu_ps(table), hi8 = _mm256_loadu_ps(table + 8);
#endif
    int64_t half = block / 2, end = first + n, full = end / 2;  /* bytes per block; bytes holding two values */
    for (int64_t b0 = first / 2; b0 < full; b0 += half) {
        int64_t b1 = b0 + half < full ? b0 + half : full, i = b0, B = b0 / half;
        float s = scale_of(B, scales, scode, smap, nested, offset), z = zero ? zero[B] : 0.0f;
#ifdef __AVX2__
        __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z);
        for (; i + 8 <= b1; i += 8) eight_bytes(codes + i, out + 2 * i, lo8, hi8, vs, vz, zero != 0);
#endif
        for (; i < b1; i++) {
            const float *p = pairs + 2 * codes[i];
            out[2 * i] = p[0] * s;
            out[2 * i + 1] = p[1] * s;
            if (zero) {
                out[2 * i] += z;
                out[2 * i + 1] += z;
            }
        }
    }
    if (end % 2) {  /* the tensor's last value sits alone in the high nibble of its last byte */
        int64_t B = (end - 1) / block;
        out[end - 1] = pairs[2 * codes[full]] * scale_of(B, scales, scode, smap, nested, offset);
        if (zero) out[end - 1] += zero[B];
    }
}
"""
PARALLEL_MIN = 1 << 22  # values per thread below which one thread does all (a thread hand-off costs ~50 us)
_lock = threading.Lock()
# process-wide: the compiled library, loaded once (a build per process, cached on disk by tunelab.accel.ckernels)
_lib: ctypes.CDLL | None | bool = False  # False: not tried yet; None: unavailable
_ARGS = [ctypes.c_void_p] * 7 + [ctypes.c_float, ctypes.c_void_p] + [ctypes.c_int64] * 3


def available() -> bool:
    """Whether the compiled kernel can be used in this process (builds it on the first call)."""
    global _lib
    with _lock:
        if _lib is False:
            _lib = ckernels.load("dequant4", SOURCE, {"tunelab_dequant4": _ARGS})
    return _lib is not None


def dequant4(codes: torch.Tensor, table: torch.Tensor, out: torch.Tensor, n: int, block: int,
             scales: torch.Tensor, zero: torch.Tensor | None = None, nested_absmax: torch.Tensor | None = None,
             offset: torch.Tensor | None = None) -> torch.Tensor | None:
    """out[:n] = table[code] * scale (+ zero) per block, from packed 4-bit codes; None without the kernel.

    codes: uint8 (ceil(n/2),); table: fp32 (16,); out: fp32, >= n elements; scales: fp32 per block, or with
    double quantization (nested_absmax given) uint8 dynamic-map codes per block, undone here as
    blockwise.dequantize_nested does; zero: fp32 per block (min-max). All contiguous CPU tensors.
    """
    if not available():
        return None
    nested = nested_absmax is not None
    args = (codes, table, scales, out) + tuple(t for t in (zero, nested_absmax) if t is not None)
    if any(t.device.type != "cpu" or not t.is_contiguous() for t in args) or out.dtype != torch.float32 \
            or codes.numel() * 2 < n or scales.numel() * block < n or out.numel() < n \
            or scales.dtype != (torch.uint8 if nested else torch.float32) or block % 2 or block < 2:
        raise ValueError("dequant4: contiguous CPU tensors of the documented sizes and dtypes expected")
    fixed = (codes.data_ptr(), table.data_ptr(), None if nested else scales.data_ptr(),
             None if zero is None else zero.data_ptr(), scales.data_ptr() if nested else None,
             _dynamic_map().data_ptr() if nested else None, nested_absmax.data_ptr() if nested else None,
             float(offset) if nested else 0.0, out.data_ptr())
    parts = min(torch.get_num_threads(), n // PARALLEL_MIN)
    step = -(-n // max(parts, 1) // block) * block  # whole blocks per part
    if step >= n:
        _lib.tunelab_dequant4(*fixed, 0, n, block)
    else:  # large tensors: one part per thread (ctypes lets go of the GIL during each call)
        list(ckernels.pool(-(-n // step)).map(
            lambda a: _lib.tunelab_dequant4(*fixed, a, min(step, n - a), block), range(0, n, step)))
    return out[:n]


@cache  # process-wide: a constant table
def _dynamic_map() -> torch.Tensor:
    assert NESTED_BLOCK == 256  # the C code groups double-quantized scales by 256
    return codebooks.dynamic_map().float().contiguous()

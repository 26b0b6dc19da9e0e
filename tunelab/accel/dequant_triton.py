"""4-bit dequantization (nf4, fp4, int4 absmax) as one Triton kernel, for CUDA tensors.

One pass reads the packed codes and the per-block scales and writes the output in its final dtype:
double-quantized scales are decoded inline (dynamic_map[code] * nested_absmax[block // 256] + offset),
where bitsandbytes runs three kernels (decode the scales, add the offset, dequantize) and PyTorch ours
runs about six. The numbers are the PyTorch path's exactly: code value * scale in fp32, one rounding to
the output dtype (round to nearest even, by hand for bf16), and no fused multiply-add when decoding the scales.

Imported lazily (by tunelab.accel.dequant, for CUDA tensors only): importing Triton takes seconds.
Without Triton, `AVAILABLE` is False and callers use the PyTorch path. TUNELAB_TRITON=0 turns it off through
train.kernels (tunelab.accel.kernels.choose reads it), e.g. to time both paths. Tests run the kernel on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1 set before Triton is imported; tests/support/triton_interp_cases.py).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from tunelab.quant import blockwise, codebooks

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch path serves every device
    triton = None

# a fact of the installation, never changed; a kernel that fails at run time is turned off per model by its
# Guard (tunelab.accel.guard), and TUNELAB_TRITON=0 is read by tunelab.accel.kernels.choose
AVAILABLE = triton is not None
# Packed bytes per program: 1024 bytes -> 2048 outputs, 8 bytes in and 16 outputs per thread at 4 warps.
BYTES_PER_PROGRAM = 1024
NUM_WARPS = 4
# bf16 output of an even count: the block-tiled kernel (_dequant4_bf16_pairs_kernel), which decodes each
# block's scale once and writes both values of a byte as one 32-bit word. Its launch: bytes per program, warps.
PAIRS = True
PAIRS_BYTES, PAIRS_WARPS = 2048, 4


def serves(qt) -> bool:
    """Whether the kernel dequantizes QuantizedTensor `qt`: Triton present, CUDA, 4-bit absmax codes."""
    return (AVAILABLE and qt.device.type == "cuda" and qt.scheme == "absmax"
            and codebooks.BITS[qt.quant_type] == 4)


if triton is not None:

    @triton.jit
    def _block_scale(scales_ptr, nested_ptr, dmap_ptr, offset_ptr, block, mask, NESTED: tl.constexpr,
                     DOUBLE: tl.constexpr):
        """The fp32 absmax of quantization block(s) `block`; double-quantized ones decoded as
        dynamic_map[code] * nested_absmax[block // NESTED] + offset (two roundings: launched without fp fusion)."""
        if DOUBLE:
            code = tl.load(scales_ptr + block, mask=mask, other=0).to(tl.int32)
            return tl.load(dmap_ptr + code) * tl.load(nested_ptr + block // NESTED, mask=mask, other=0) + tl.load(offset_ptr)
        return tl.load(scales_ptr + block, mask=mask, other=0.0)

    @triton.jit
    def _bf16_bits(v):
        """fp32 `v` rounded to nearest even bf16, as its 16 bits in a uint32 (Triton's interpreter truncates)."""
        bits = v.to(tl.uint32, bitcast=True)
        return (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16

    @triton.jit
    def _dequant4_kernel(codes_ptr, book_ptr, scales_ptr, nested_ptr, dmap_ptr, offset_ptr, out_ptr, n,
                         HALF_BLOCK: tl.constexpr, NESTED: tl.constexpr, DOUBLE: tl.constexpr,
                         BF16: tl.constexpr, BYTES: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        j = pid * BYTES + tl.arange(0, BYTES)  # (BYTES,) byte index; byte j holds elements 2j (high), 2j+1
        in_range = j < (n + 1) // 2
        byte = tl.load(codes_ptr + j, mask=in_range, other=0).to(tl.int32)
        hi = tl.load(book_ptr + (byte >> 4))  # the 16-entry fp32 code book, from L1
        lo = tl.load(book_ptr + (byte & 15))
        block = j // HALF_BLOCK  # elements 2j and 2j+1 share a block: block sizes are even
        scale = _block_scale(scales_ptr, nested_ptr, dmap_ptr, offset_ptr, block, in_range, NESTED, DOUBLE)
        vals = tl.interleave(hi * scale, lo * scale)  # (2 * BYTES,): element order 2j, 2j+1
        e = pid * (2 * BYTES) + tl.arange(0, 2 * BYTES)
        if BF16:  # out_ptr: int16 view of bf16
            tl.store(out_ptr + e, _bf16_bits(vals).to(tl.int16), mask=e < n)
        else:
            tl.store(out_ptr + e, vals.to(out_ptr.dtype.element_ty), mask=e < n)


    @triton.jit
    def _dequant4_bf16_pairs_kernel(codes_ptr, book_ptr, scales_ptr, nested_ptr, dmap_ptr, offset_ptr, out_ptr,
                                    nbytes, HALF_BLOCK: tl.constexpr, NESTED: tl.constexpr, DOUBLE: tl.constexpr,
                                    ROWS: tl.constexpr):
        """ROWS quantization blocks per program as a (ROWS, HALF_BLOCK) tile of bytes: each block's scale is
        loaded (and decoded, with double quant) once, not once per byte; out_ptr is an int32 view of the
        bf16 output, byte j -> word j = bf16(2j) | bf16(2j + 1) << 16 (little-endian element order)."""
        blocks = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
        j = blocks[:, None] * HALF_BLOCK + tl.arange(0, HALF_BLOCK)[None, :]  # (ROWS, HALF_BLOCK) byte index
        in_range = j < nbytes
        block_ok = blocks * HALF_BLOCK < nbytes
        byte = tl.load(codes_ptr + j, mask=in_range, other=0).to(tl.int32)
        scale = _block_scale(scales_ptr, nested_ptr, dmap_ptr, offset_ptr, blocks, block_ok, NESTED, DOUBLE)
        hi = _bf16_bits(tl.load(book_ptr + (byte >> 4)) * scale[:, None])
        lo = _bf16_bits(tl.load(book_ptr + (byte & 15)) * scale[:, None])
        tl.store(out_ptr + j, (hi | (lo << 16)).to(tl.int32, bitcast=True), mask=in_range)


@lru_cache(maxsize=None)  # process-wide: a constant (16 floats) per (format, device)
def _book16(quant_type: str, device: torch.device) -> torch.Tensor:
    """The fp32 code book padded to 16 entries (int4 uses 15 patterns; the 16th never occurs)."""
    book = codebooks.code(quant_type, device)
    return torch.cat([book, book.new_zeros(16 - len(book))])


def dequantize_4bit(qt, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Flat (n,) dequantized values of a 4-bit absmax QuantizedTensor `qt`, in `dtype`.

    out: a flat `dtype` tensor of at least n elements on qt's device to write into (a view is returned).
    """
    if triton is None:
        raise RuntimeError("tunelab.accel.dequant_triton.dequantize_4bit needs Triton; check AVAILABLE first")
    n, device = qt.numel(), qt.device
    if out is None:
        out = torch.empty(n, dtype=dtype, device=device)
    if qt.double_quant:
        nested, dmap, offset = qt.nested_absmax, codebooks.dynamic_map(device), qt.offset.reshape(1)
    else:  # unused by the kernel (DOUBLE is a compile-time False), any valid pointer will do
        nested = dmap = offset = qt.scales
    nbytes = (n + 1) // 2
    bf16 = dtype == torch.bfloat16
    if PAIRS and bf16 and n % 2 == 0 and out.data_ptr() % 4 == 0:
        half = qt.block_size // 2
        rows = max(1, PAIRS_BYTES // half)
        grid = (triton.cdiv(triton.cdiv(nbytes, half), rows),)
        _dequant4_bf16_pairs_kernel[grid](qt.data, _book16(qt.quant_type, device), qt.scales, nested, dmap, offset,
                                          out[:n].view(torch.int32), nbytes, HALF_BLOCK=half,
                                          NESTED=blockwise.NESTED_BLOCK, DOUBLE=qt.double_quant, ROWS=rows,
                                          num_warps=PAIRS_WARPS, enable_fp_fusion=False)
        return out[:n]
    grid = (triton.cdiv(nbytes, BYTES_PER_PROGRAM),)
    _dequant4_kernel[grid](qt.data, _book16(qt.quant_type, device), qt.scales, nested, dmap, offset,
                           out.view(torch.int16) if bf16 else out, n, HALF_BLOCK=qt.block_size // 2,
                           NESTED=blockwise.NESTED_BLOCK, DOUBLE=qt.double_quant, BF16=bf16, BYTES=BYTES_PER_PROGRAM, num_warps=NUM_WARPS, enable_fp_fusion=False)
    return out[:n]


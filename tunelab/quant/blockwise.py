"""Blockwise quantization kernels in plain PyTorch: absmax and min-max codes, nibble packing, double quant.

Layout (bitsandbytes' own, so bytes move between the libraries unchanged):
- a tensor of n elements is read flat and cut into blocks of `block_size`; the last block may be short;
- absmax: scale = max|x| per block (fp32), code index = nearest code-book value of x / scale;
- 4-bit codes are packed two per byte, element 2i in the HIGH nibble and 2i+1 in the low one; an odd
  count pads one zero-valued code;
- double quantization stores the per-block scales as 8-bit dynamic codes of (scale - mean) in blocks of
  256, plus one fp32 absmax per 256 scales and the mean ("offset").

Speed on CPU comes from two things: work in cache-sized chunks with scratch buffers that are reused (a
fresh 64 MB tensor costs more in page faults than the arithmetic), and replace the binary search for the
nearest code by table look-ups (see `_NearestCode`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

from tunelab.quant import codebooks

# Elements per CPU step: big enough that ATen spreads each op over its threads, small enough that the
# step's scratch buffers (reused, so they cost no page faults) stay in the L3 cache. On an idle 2-core
# machine, 1M-element steps dequantize a 4096x4096 NF4 weight in ~20 ms, 256K-element steps in ~30 ms
# and the whole tensor at once (fresh temporaries) in ~45 ms.
CHUNK = 1 << 20
# Double quantization block (QLoRA section 3): 256 scales share one fp32 absmax.
NESTED_BLOCK = 256
# bitsandbytes clamps a zero absmax to this before dividing, so all-zero blocks give code "0".
_TINY = 1e-38


@lru_cache(maxsize=1)
def _madvise():
    """libc's madvise, or None off Linux."""
    import ctypes
    import ctypes.util

    if sys.platform != "linux":
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


_HUGE = 1 << 21  # a transparent huge page (x86-64 / arm64 default)
_MADV_HUGEPAGE = 14


def empty_output(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty(n) for a result we are about to fill; large CPU ones ask Linux for huge pages.

    A fresh 64 MiB tensor is 16384 page faults on first write, which cost more than the dequantization
    itself on this machine (190 ms vs 65 ms to fill one, measured). madvise(MADV_HUGEPAGE) on the
    2 MiB-aligned interior turns them into 32 faults; without THP support the call is a no-op.
    """
    out = torch.empty(n, dtype=dtype, device=device)
    madvise = _madvise() if device.type == "cpu" and out.nbytes >= 4 * _HUGE else None
    if madvise is not None:
        lo = (out.data_ptr() + _HUGE - 1) & ~(_HUGE - 1)
        hi = (out.data_ptr() + out.nbytes) & ~(_HUGE - 1)
        madvise(lo, hi - lo, _MADV_HUGEPAGE)  # advice only: an error just leaves normal pages
    return out


def for_chunks(device: torch.device, n: int, block_size: int, make_scratch: Callable[[int], object],
               work: Callable[[int, int, object], None]) -> None:
    """Call work(start, stop, scratch) over [0, n) in block-aligned steps sharing one scratch.

    GPUs: one step over everything (one launch per op). CPU: CHUNK-sized steps, ATen threading each op.
    """
    if n == 0:
        return
    step = n if device.type != "cpu" else max(CHUNK // block_size, 1) * block_size
    scratch = make_scratch(min(step, n))
    for start in range(0, n, step):
        work(start, min(start + step, n), scratch)


# ----------------------------------------------------------------------------------------------
# Nearest code by table look-up (exactly torch.bucketize against the code midpoints, as bitsandbytes)
# ----------------------------------------------------------------------------------------------

_HALF_CELLS = 2048  # cells per unit of s = x / scale; s * 2048 is exact (power of two)


class _NearestCode:
    """Maps y = 2048 * x/scale to the index of the nearest code, ties to the lower code value.

    bitsandbytes computes `bucketize(s, midpoints)` = #{midpoints m : m < s}, a binary search that takes
    ~30 ns per element on this CPU. Here [-1, 1] is cut into 4096 equal cells, c = trunc(y) + 2048. The
    code books' midpoints are farther apart than a cell, so a cell holds at most one midpoint and
        #{m < s} = below[c] + (y > mid[c]),
    where below[c] counts the midpoints of cells left of c and mid[c] is the (scaled) midpoint inside
    cell c, or +inf. trunc is monotone, so this is exact for every float, ties included.
    """

    def __init__(self, code: torch.Tensor):
        # Sorted positions -> code index. argsort exactly as bitsandbytes does, which also fixes where
        # FP4's two zeros (+0 and -0) land: positive tiny values take the -0 code there, and so here.
        self.order = torch.argsort(code)
        ordered = code[self.order]
        mids = ((ordered[:-1] + ordered[1:]) / 2) * _HALF_CELLS  # same fp32 ops as bitsandbytes, scaled
        cells = mids.to(torch.int32) + _HALF_CELLS
        ncell = 2 * _HALF_CELLS + 1
        counts = torch.bincount(cells.long(), minlength=ncell)
        if counts.max() > 1:
            raise AssertionError("code book too dense for the cell table")
        self.below = (torch.cumsum(counts, 0) - counts).to(torch.uint8)  # (ncell,)
        self.mid = torch.full((ncell,), float("inf"))
        self.mid[cells.long()] = mids
        self.pack = pack_table(self.order) if len(code) <= 16 else None  # 4-bit books only

    def to(self, device: torch.device) -> "_NearestCode":
        new = object.__new__(_NearestCode)
        for k, v in vars(self).items():
            setattr(new, k, v.to(device) if isinstance(v, torch.Tensor) else v)
        return new

    def encode_(self, y: torch.Tensor, cell: torch.Tensor, fscratch: torch.Tensor, bscratch: torch.Tensor,
                out: torch.Tensor) -> torch.Tensor:
        """Sorted-position codes of flat finite y = x / scale (fp32, |y| <= 1 up to rounding) into `out`
        (uint8); all the same length. y is scaled by 2048 in place (exact: a power of two)."""
        y.mul_(_HALF_CELLS)
        cell.copy_(y)  # float -> int32 truncates toward zero
        cell.add_(_HALF_CELLS)
        torch.index_select(self.below, 0, cell, out=out)
        torch.index_select(self.mid, 0, cell, out=fscratch)
        torch.gt(y, fscratch, out=bscratch)
        return out.add_(bscratch)


@lru_cache(maxsize=None)
def _nearest_cpu(quant_type: str) -> _NearestCode:
    return _NearestCode(codebooks.code(quant_type))


@lru_cache(maxsize=None)
def nearest_code(quant_type: str, device: torch.device) -> _NearestCode:
    return _nearest_cpu(quant_type).to(device)


# ----------------------------------------------------------------------------------------------
# Quantize
# ----------------------------------------------------------------------------------------------


@dataclass
class _Scratch:
    """Per-worker buffers of one step (flat, `size` elements)."""

    cell: torch.Tensor
    f: torch.Tensor
    b: torch.Tensor
    q: torch.Tensor
    y: torch.Tensor

    @classmethod
    def make(cls, size: int, device: torch.device) -> "_Scratch":
        size += size % 2
        return cls(cell=torch.empty(size, dtype=torch.int32, device=device), f=torch.empty(size, device=device),
                   b=torch.empty(size, dtype=torch.bool, device=device),
                   q=torch.empty(size, dtype=torch.uint8, device=device), y=torch.empty(size, device=device))


def block_absmax(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    """(blocks,) fp32 max|x| per block of a flat tensor, last block possibly short (no |x| temporary)."""
    n = flat.numel()
    full = n - n % block_size
    parts = []
    if full:
        blocks = flat[:full].view(-1, block_size)
        parts.append(torch.maximum(blocks.amax(1), blocks.amin(1).neg_()).float())
    if full < n:
        parts.append(flat[full:].abs().amax().float().view(1))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def pack_table(order: torch.Tensor) -> torch.Tensor:
    """uint8 table: two 4-bit sorted positions (a, b), read as one int16 word v, -> packed byte.

    The byte is order[a] << 4 | order[b] (first element in the high nibble; `order` maps sorted position
    to code index, the identity except for FP4). Reading pairs as int16 turns packing into one look-up;
    v < 4096 since a, b < 16, and the table is filled through the machine's own view (any byte order).
    """
    k = len(order)
    pairs = torch.cartesian_prod(torch.arange(k), torch.arange(k)).to(torch.uint8)  # (k*k, 2): (a, b)
    words = pairs.contiguous().view(torch.int16).view(-1).long()
    table = torch.zeros(int(words.max()) + 1, dtype=torch.uint8)
    p = pairs.long()
    table[words] = (order[p[:, 0]] * 16 + order[p[:, 1]]).to(torch.uint8)
    return table


def pack_into(q: torch.Tensor, out: torch.Tensor, pack: torch.Tensor, scratch: torch.Tensor) -> None:
    """Two 4-bit codes per byte: out (m,) from q (2m,) uint8 sorted positions via `pack_table`.

    scratch: int32, at least m elements.
    """
    words = scratch[: out.numel()]
    words.copy_(q.view(torch.int16))
    torch.index_select(pack, 0, words, out=out)


def quantize_absmax(flat: torch.Tensor, quant_type: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat float tensor -> (codes uint8, absmax fp32 (blocks,)); 4-bit codes come packed.

    Bit for bit what bitsandbytes' CPU path computes: s = x * (1 / max(absmax, 1e-38)) for full
    blocks, s = x / max(absmax, 1e-38) for a short last block, then the nearest code.
    """
    n, device = flat.numel(), flat.device
    four = codebooks.BITS[quant_type] == 4
    table = nearest_code(quant_type, device)
    absmax = torch.empty(-(-n // block_size), device=device)
    out = empty_output((n + 1) // 2 if four else n, torch.uint8, device)
    full = n - n % block_size

    def work(start: int, stop: int, s: _Scratch) -> None:
        m, b0, b1 = stop - start, start // block_size, stop // block_size
        x, y, tmp = flat[start:stop].view(-1, block_size), s.y[:m].view(-1, block_size), s.f[:m].view(-1, block_size)
        if x.dtype != torch.float32:  # fp16/bf16: widen once (exact), as bitsandbytes does first
            x = y.copy_(x)
        torch.amax(torch.abs(x, out=tmp), 1, out=absmax[b0:b1])
        recip = torch.reciprocal(absmax[b0:b1].clamp(min=_TINY))
        torch.mul(x, recip[:, None], out=y)
        if four:
            q = table.encode_(s.y[:m], s.cell[:m], s.f[:m], s.b[:m], s.q[:m])
            pack_into(q, out[start // 2: stop // 2], table.pack, s.cell)
        else:
            table.encode_(s.y[:m], s.cell[:m], s.f[:m], s.b[:m], out[start:stop])

    try:
        for_chunks(device, full, block_size, lambda size: _Scratch.make(size, device), work)
    except (IndexError, RuntimeError):  # NaN/Inf make out-of-range cells; say so instead
        _check_finite(absmax[: full // block_size])
        raise
    if full < n:  # short last block: divide, as bitsandbytes does there; pad an odd count with s = 0
        absmax[-1] = flat[full:].abs().amax()
        tail = flat[full:].float() / absmax[-1].clamp(min=_TINY)
        if four and tail.numel() % 2:
            tail = torch.cat([tail, tail.new_zeros(1)])
        k = tail.numel()
        s = _Scratch.make(k, device)
        _check_finite(absmax[-1:])
        q = table.encode_(s.y[:k].copy_(tail), s.cell[:k], s.f[:k], s.b[:k], s.q[:k])
        if four:
            pack_into(q, out[full // 2:], table.pack, s.cell)
        else:
            out[full:] = q
    _check_finite(absmax)
    return out, absmax


def quantize_minmax(flat: torch.Tensor, quant_type: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric codes: scale = (max - min) / (2^bits - 1), q = round((x - min) / scale).

    Returns (codes uint8, packed two per byte for int4; scale fp32 (blocks,); minimum fp32 (blocks,)).
    A constant block has scale 0 and codes 0, so it dequantizes to its value exactly.
    """
    n, device = flat.numel(), flat.device
    levels = 2 ** codebooks.BITS[quant_type] - 1
    pad = -n % block_size
    x = flat.float()
    if pad:  # repeat the last value: it changes neither the minimum nor the maximum of the last block
        x = torch.cat([x, x[-1:].expand(pad)])
    blocks = x.view(-1, block_size)
    lo, hi = blocks.amin(1), blocks.amax(1)
    _check_finite(torch.stack([lo, hi]))
    scale = (hi - lo) / levels
    recip = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = ((blocks - lo[:, None]) * recip[:, None]).round_().clamp_(0, levels).to(torch.uint8).view(-1)[:n]
    if levels == 15:
        if n % 2:
            q = torch.cat([q, q.new_zeros(1)])
        packed = torch.empty(q.numel() // 2, dtype=torch.uint8, device=device)
        pack_into(q, packed, _identity_pack(device), torch.empty(q.numel(), dtype=torch.int32, device=device))
        q = packed
    return q, scale, lo


@lru_cache(maxsize=None)
def _identity_pack(device: torch.device) -> torch.Tensor:
    return pack_table(torch.arange(16)).to(device)


def _check_finite(stats: torch.Tensor) -> None:
    from tunelab.quant.tensor import QuantError

    if not bool(torch.isfinite(stats).all()):
        raise QuantError("the tensor holds NaN or Inf values, which have no quantized code; clean the weights first")


# ----------------------------------------------------------------------------------------------
# Double quantization of the per-block scales (bitsandbytes' 8-bit blockwise CPU kernel, replicated)
# ----------------------------------------------------------------------------------------------


def quantize_nested(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 scales (m,) -> (codes uint8 (m,), nested absmax fp32 (ceil(m/256),), offset fp32 scalar).

    As bitsandbytes 0.50 on CPU: subtract the mean; per block of 256, v = a * (1 / max|a|) (a zero block
    gets code 0); then its 65536-entry look-up table: i = trunc((clamp(v, -1, 1) + 1) * 0.5 * 65535 + 0.5)
    and code = the number of dynamic-map midpoints below -1 + 2i / 65535.
    """
    offset = scales.mean()  # one whole-tensor reduction, exactly as bitsandbytes sums
    if not bool(torch.isfinite(offset)):  # block maxima near float32's limit: their sum overflows
        from tunelab.quant.tensor import QuantError

        raise QuantError("double quantization cannot center the block scales: their mean overflows float32 "
                         f"(largest scale {float(scales.max()):.3g}); quantize with double_quant=false")
    m, device = scales.numel(), scales.device
    nested_absmax = torch.empty(-(-m // NESTED_BLOCK), device=device)
    codes = torch.empty(m, dtype=torch.uint8, device=device)
    lut = _dynamic_lut(device)

    def work(start: int, stop: int, _) -> None:
        a = scales[start:stop] - offset
        b0 = start // NESTED_BLOCK
        am = block_absmax(a, NESTED_BLOCK)
        nested_absmax[b0: b0 + am.numel()] = am
        inv = torch.where(am == 0, 0.0, 1.0 / am)  # a zero block: v = 0 here, code 0 below
        pad = -a.numel() % NESTED_BLOCK
        v = torch.nn.functional.pad(a, (0, pad)).view(-1, NESTED_BLOCK).mul_(inv[:, None]).view(-1)[: a.numel()]
        i = v.clamp_(-1.0, 1.0).add_(1.0).mul_(0.5).mul_(65535.0).add_(0.5).to(torch.int32)
        torch.index_select(lut, 0, i, out=codes[start:stop])
        codes[start:stop].view(-1)[(am == 0).repeat_interleave(NESTED_BLOCK)[: a.numel()]] = 0

    for_chunks(device, m, NESTED_BLOCK, lambda size: None, work)
    return codes, nested_absmax, offset


@lru_cache(maxsize=None)
def _dynamic_lut(device: torch.device) -> torch.Tensor:
    """(65536,) uint8: dynamic-map index for each grid point -1 + 2i/65535 (bitsandbytes' CPU table)."""
    code = codebooks.dynamic_map()
    mids = (code[:-1] + code[1:]) * 0.5
    grid = torch.tensor(-1.0) + (2.0 * torch.arange(65536)).float() / torch.tensor(65535.0)
    return torch.searchsorted(mids, grid).to(torch.uint8).to(device)  # #{mids < grid point}


def dequantize_nested(codes: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor,
                      start: int = 0) -> torch.Tensor:
    """The fp32 scales back: dynamic_map[code] * nested_absmax[block] + offset (bitsandbytes' order).

    `codes` may be a slice of all codes beginning at scale index `start`.
    """
    device, m = codes.device, codes.numel()
    vals = torch.index_select(codebooks.dynamic_map(device), 0, codes.int())
    g0, full = start // NESTED_BLOCK, m - m % NESTED_BLOCK
    if start % NESTED_BLOCK == 0 and full:  # aligned (the common case): whole groups as rows
        rows = vals[:full].view(-1, NESTED_BLOCK)
        rows.mul_(nested_absmax[g0: g0 + rows.shape[0], None])
        if full < m:
            vals[full:].mul_(nested_absmax[g0 + rows.shape[0]])
    else:
        group = torch.arange(start, start + m, device=device) // NESTED_BLOCK  # (m,) nested block
        vals.mul_(nested_absmax[group])
    return vals.add_(offset)


# ----------------------------------------------------------------------------------------------
# Dequantize
# ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _byte_lut_cpu(book: str) -> torch.Tensor:
    """(256,) int64: for each packed byte, its two fp32 code values (high nibble first) as one 8-byte word.

    index_select on a 1-D table of 8-byte words is a vectorized copy; on a (256, 2) float table it takes
    a per-row path ~10x slower. The words are built by viewing the float pairs, so byte order is moot.
    """
    code = code_table16(book)
    byte = torch.arange(256)
    return torch.stack([code[byte >> 4], code[byte & 15]], 1).contiguous().view(torch.int64).view(-1)


@lru_cache(maxsize=None)
def code_table16(book: str) -> torch.Tensor:
    """(16,) fp32: a 4-bit code book's values, padded with zeros (int4 uses 15 of the 16 patterns)."""
    code = codebooks.code(book).float()
    return torch.cat([code, code.new_zeros(16 - len(code))]).contiguous()


@lru_cache(maxsize=None)
def byte_lut(book: str, device: torch.device) -> torch.Tensor:
    return _byte_lut_cpu(book).to(device)


def unpack_values(codes: torch.Tensor, book: str, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Code-book values (fp32, flat) of the first n codes of `book` (a code-book name); 4-bit come packed.

    `out` (fp32, at least n + 1 elements, starting at an even element offset) may be given to avoid a
    fresh tensor. Returns a flat view of length n.
    """
    device = codes.device
    if out is None:
        out = torch.empty(n + 2, device=device)
    if codebooks.bits(book) == 8:
        return torch.index_select(codebooks.code(book, device), 0, codes[:n].int(), out=out[:n])
    nbytes = codes.numel()
    words = out[: 2 * nbytes].view(torch.int64)  # one word = the two values of one byte
    torch.index_select(byte_lut(book, device), 0, codes.int(), out=words)
    return out[:n]


def dequantize_blocks(codes: torch.Tensor, book: str, n: int, block_size: int,
                      scales: Callable[[int, int], torch.Tensor], zero: torch.Tensor | None,
                      dtype: torch.dtype, result: torch.Tensor | None = None) -> torch.Tensor:
    """Flat dequantized tensor (n,) in `dtype`: code value * scale (+ zero for min-max), in fp32.

    scales(b0, b1) gives the fp32 scales of blocks b0..b1-1 (undoing double quantization there, so
    it runs per step too). Per step: codes -> values through the pair table (fp32, straight into the
    output when it is fp32), times the block scales, then one converting copy for fp16/bf16.
    `result` (flat, `dtype`, >= n + 2 elements) may be given to reuse memory.
    """
    device = codes.device
    if result is None:
        result = empty_output(n + 2, dtype, device)
    per_byte = 2 if codebooks.bits(book) == 4 else 1

    def work(start: int, stop: int, scratch: torch.Tensor | None) -> None:
        buf = result[start: stop + 2] if scratch is None else scratch
        vals = unpack_values(codes[start // per_byte: -(-stop // per_byte)], book, stop - start, out=buf)
        b0 = start // block_size
        _scale_(vals, b0, block_size, scales(b0, -(-stop // block_size)), zero)
        if scratch is not None:
            result[start:stop].copy_(vals)

    def make_scratch(size: int) -> torch.Tensor | None:
        return None if dtype == torch.float32 else torch.empty(size + 2, device=device)

    for_chunks(device, n, block_size, make_scratch, work)
    return result[:n]


def _scale_(vals: torch.Tensor, b0: int, block_size: int, scales: torch.Tensor, zero: torch.Tensor | None) -> None:
    """In place: vals (flat, blocks b0..) = vals * scales[i] (+ zero[b0 + i] for min-max); scales local."""
    m = vals.numel()
    full = m - m % block_size
    nb = full // block_size
    if full:
        blocks = vals[:full].view(nb, block_size)
        blocks.mul_(scales[:nb, None])
        if zero is not None:
            blocks.add_(zero[b0: b0 + nb, None])
    if full < m:
        vals[full:].mul_(scales[nb])
        if zero is not None:
            vals[full:].add_(zero[b0 + nb])

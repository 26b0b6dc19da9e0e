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

from dataclasses import dataclass
from functools import lru_cache

import torch

from tunelab.quant import codebooks

# Elements per chunk on CPU: 4 scratch buffers of this size stay in L2 (~1 MiB each).
CHUNK = 1 << 18
# Double quantization block (QLoRA section 3): 256 scales share one fp32 absmax.
NESTED_BLOCK = 256
# bitsandbytes clamps a zero absmax to this before dividing, so all-zero blocks give code "0".
_TINY = 1e-38


def _chunk_elems(device: torch.device, block_size: int) -> int:
    """Elements per step: whole tensors on GPUs (one launch per op), cache-sized chunks on CPU."""
    if device.type != "cpu":
        return 1 << 62
    return max(CHUNK // block_size, 1) * block_size


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
        # For FP4 the packed byte of two sorted positions is remapped to code indices in one look-up.
        pos = torch.arange(256)
        self.byte_remap = (self.order[pos >> 4] * 16 + self.order[pos & 15]).to(torch.uint8) if len(code) == 16 else None
        self.identity = bool(torch.equal(self.order, torch.arange(len(code))))

    def to(self, device: torch.device) -> "_NearestCode":
        new = object.__new__(_NearestCode)
        for k, v in vars(self).items():
            setattr(new, k, v.to(device) if isinstance(v, torch.Tensor) else v)
        return new

    def encode_(self, y: torch.Tensor, cell: torch.Tensor, fscratch: torch.Tensor, bscratch: torch.Tensor,
                out: torch.Tensor) -> torch.Tensor:
        """Sorted-position codes of flat y (fp32, already 2048 * s) into `out` (uint8); all same length."""
        y.clamp_(-_HALF_CELLS, _HALF_CELLS)  # |s| <= 1 up to rounding; a clamp never crosses a midpoint
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
class Scratch:
    """Reusable per-call buffers of one chunk (flat, `size` elements)."""

    y: torch.Tensor
    cell: torch.Tensor
    f: torch.Tensor
    b: torch.Tensor
    q: torch.Tensor

    @classmethod
    def make(cls, size: int, device: torch.device) -> "Scratch":
        return cls(
            y=torch.empty(size, device=device),
            cell=torch.empty(size, dtype=torch.int32, device=device),
            f=torch.empty(size, device=device),
            b=torch.empty(size, dtype=torch.bool, device=device),
            q=torch.empty(size, dtype=torch.uint8, device=device),
        )


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


def _pack_into(q: torch.Tensor, out: torch.Tensor) -> None:
    """Two 4-bit codes per byte, first in the high nibble: out[i] = q[2i] << 4 | q[2i+1]."""
    torch.mul(q[0::2], 16, out=out)
    out.add_(q[1::2])


def quantize_absmax(flat: torch.Tensor, quant_type: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat float tensor -> (codes uint8, absmax fp32 (blocks,)); 4-bit codes come packed.

    Bit for bit what bitsandbytes' CPU path computes: s = x * (1 / max(absmax, 1e-38)) for full
    blocks, s = x / max(absmax, 1e-38) for a short last block, then the nearest code.
    """
    n, device = flat.numel(), flat.device
    bits = codebooks.BITS[quant_type]
    table = nearest_code(quant_type, device)
    absmax = block_absmax(flat, block_size)
    _check_finite(absmax)
    # Scaled reciprocal: x * (2048 / absmax) == 2048 * (x * (1 / absmax)) exactly (power-of-two factor).
    recip = ((1.0 / absmax.clamp(min=_TINY)) * _HALF_CELLS).clamp(max=torch.finfo(torch.float32).max)  # 0*inf = NaN
    out = torch.empty((n + 1) // 2 if bits == 4 else n, dtype=torch.uint8, device=device)

    full = n - n % block_size
    step = _chunk_elems(device, block_size)
    s = Scratch.make(min(step, full) if full else 0, device)
    for start in range(0, full, step):
        stop = min(start + step, full)
        m = stop - start
        y = s.y[:m]
        torch.mul(flat[start:stop].view(-1, block_size), recip[start // block_size: stop // block_size, None],
                  out=y.view(-1, block_size))
        q = table.encode_(y, s.cell[:m], s.f[:m], s.b[:m], s.q[:m] if bits == 4 else out[start:stop])
        if bits == 4:
            _pack_into(q, out[start // 2: stop // 2])
    if full < n:  # short last block: divide, as bitsandbytes does there; pad an odd count with s = 0
        tail = flat[full:].float() / absmax[-1].clamp(min=_TINY)
        if bits == 4 and tail.numel() % 2:
            tail = torch.cat([tail, tail.new_zeros(1)])
        y = tail * _HALF_CELLS
        k = y.numel()
        q = torch.empty(k, dtype=torch.uint8, device=device)
        q = table.encode_(y, torch.empty(k, dtype=torch.int32, device=device), torch.empty_like(y),
                          torch.empty(k, dtype=torch.bool, device=device), q)
        if bits == 4:
            _pack_into(q, out[full // 2:])
        else:
            out[full:] = q
    if not table.identity:
        out = table.byte_remap[out.long()] if bits == 4 else table.order.to(torch.uint8)[out.long()]
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
        _pack_into(q, packed)
        q = packed
    return q, scale, lo


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
    offset = scales.mean()
    a = scales - offset
    m = a.numel()
    nested_absmax = block_absmax(a, NESTED_BLOCK)
    zero_block = nested_absmax == 0
    inv = torch.where(zero_block, 0.0, 1.0 / nested_absmax).repeat_interleave(NESTED_BLOCK)[:m]
    v = (a * inv).clamp_(-1.0, 1.0)
    i = ((v + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int64)
    codes = _dynamic_lut(a.device)[i]
    codes[zero_block.repeat_interleave(NESTED_BLOCK)[:m]] = 0
    return codes, nested_absmax, offset


@lru_cache(maxsize=None)
def _dynamic_lut(device: torch.device) -> torch.Tensor:
    """(65536,) uint8: dynamic-map index for each grid point -1 + 2i/65535 (bitsandbytes' CPU table)."""
    code = codebooks.dynamic_map()
    mids = (code[:-1] + code[1:]) * 0.5
    grid = torch.tensor(-1.0) + (2.0 * torch.arange(65536)).float() / torch.tensor(65535.0)
    return torch.searchsorted(mids, grid).to(torch.uint8).to(device)  # #{mids < grid point}


def dequantize_nested(codes: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The fp32 scales back: dynamic_map[code] * nested_absmax[block] + offset (bitsandbytes' order)."""
    m = codes.numel()
    vals = codebooks.dynamic_map(codes.device)[codes.long()]
    per_elem = nested_absmax.repeat_interleave(NESTED_BLOCK)[:m]
    return vals * per_elem + offset


# ----------------------------------------------------------------------------------------------
# Dequantize
# ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _pair_lut_cpu(quant_type: str) -> torch.Tensor:
    """(65536, 4) fp32: the 4 code values of every 2-byte pair, indexed by the pair read as int16.

    Reading packed bytes two at a time halves the number of look-ups. The table is filled through the
    machine's own int16 view, so it holds on any byte order.
    """
    code = torch.nn.functional.pad(codebooks.code(quant_type), (0, 16))  # int4 has 15 codes; indices 15.. stay unused
    pairs = torch.arange(65536).to(torch.uint8).view(-1, 1)  # low byte ...
    pairs = torch.cat([pairs, (torch.arange(65536) >> 8).to(torch.uint8).view(-1, 1)], 1)
    key = pairs.contiguous().view(torch.int16).view(-1).long() & 0xFFFF
    p = pairs.long()
    values = torch.stack([code[p[:, 0] >> 4], code[p[:, 0] & 15], code[p[:, 1] >> 4], code[p[:, 1] & 15]], 1)
    lut = torch.empty_like(values)
    lut[key] = values
    return lut


@lru_cache(maxsize=None)
def pair_lut(quant_type: str, device: torch.device) -> torch.Tensor:
    return _pair_lut_cpu(quant_type).to(device)


def unpack_values(codes: torch.Tensor, book: str, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Code-book values (fp32, flat) of the first n codes of `book` (a code-book name); 4-bit come packed.

    `out` (fp32, at least n + 4 elements) may be given to avoid a fresh tensor. Returns a flat view of
    length n.
    """
    device = codes.device
    if out is None:
        out = torch.empty(n + 4, device=device)
    if codebooks.bits(book) == 8:
        return torch.index_select(codebooks.code(book, device), 0, codes[:n].int(), out=out[:n])
    nbytes = codes.numel()
    even = nbytes - nbytes % 2
    if even:
        idx = codes[:even].view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF)
        torch.index_select(pair_lut(book, device), 0, idx, out=out[: 2 * even].view(-1, 4))
    if even < nbytes:
        last = codes[even:].long()
        code = codebooks.code(book, device)
        out[2 * even: 2 * even + 2] = torch.cat([code[last >> 4], code[last & 15]])
    return out[:n]


def dequantize_blocks(codes: torch.Tensor, book: str, n: int, block_size: int, scales: torch.Tensor,
                      zero: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Flat dequantized tensor (n,) in `dtype`: code value * scale (+ zero for min-max), in fp32.

    CPU works in chunks: codes -> values through the pair table into fp32 scratch, times the scales,
    then one write into the output (converting dtype only there).
    """
    device = codes.device
    result = torch.empty(n + 4, dtype=dtype, device=device)
    per_byte = 2 if codebooks.bits(book) == 4 else 1
    step = _chunk_elems(device, block_size)
    scratch = None if dtype == torch.float32 else torch.empty(min(step, n) + 4, device=device)
    for start in range(0, n, step):
        stop = min(start + step, n)
        buf = result[start: stop + 4] if scratch is None else scratch
        vals = unpack_values(codes[start // per_byte: -(-stop // per_byte)], book, stop - start, out=buf)
        _scale_(vals, start // block_size, block_size, scales, zero)
        if scratch is not None:
            result[start:stop].copy_(vals)
    return result[:n]


def _scale_(vals: torch.Tensor, b0: int, block_size: int, scales: torch.Tensor, zero: torch.Tensor | None) -> None:
    """In place: vals (flat, starting at block b0) = vals * scale[block] (+ zero[block] for min-max)."""
    m = vals.numel()
    full = m - m % block_size
    nb = full // block_size
    if full:
        blocks = vals[:full].view(nb, block_size)
        blocks.mul_(scales[b0: b0 + nb, None])
        if zero is not None:
            blocks.add_(zero[b0: b0 + nb, None])
    if full < m:
        vals[full:].mul_(scales[b0 + nb])
        if zero is not None:
            vals[full:].add_(zero[b0 + nb])

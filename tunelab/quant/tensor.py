"""`QuantizedTensor` (packed codes + per-block state) and `quantize()`, the entry point of tunelab.quant."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

import torch

from tunelab.errors import TunelabError
from tunelab.quant import blockwise, codebooks

SCHEMES = ("absmax", "minmax")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# bitsandbytes' 4-bit kernels accept these block sizes; 8-bit ones too (plus larger, which we don't need).
MIN_BLOCK, MAX_BLOCK = 32, 4096
# Name of the packed non-tensor state in a bitsandbytes state dict: "<prefix>weight.quant_state.bitsandbytes__nf4".
_BNB_QS = "quant_state.bitsandbytes__"


class QuantError(TunelabError, ValueError):
    """A tensor or option that cannot be quantized as asked; the message says what to change."""


@dataclass
class QuantizedTensor:
    """A tensor stored as blockwise low-bit codes.

    data:    uint8 codes, flat; 4-bit codes two per byte (element 2i in the high nibble), ceil(n/2) bytes
    scales:  per block (blocks,): fp32 absmax (absmax) or step (minmax); uint8 dynamic codes when nested
    zero:    per-block minimum, fp32 (minmax only)
    nested_absmax, offset: double quantization state (fp32 (ceil(blocks/256),), fp32 scalar) or None
    shape, dtype: of the original tensor; quant_type: nf4 | fp4 | int4 | int8; block_size; scheme
    shard:   None, or (b0, b1) when data/scales/zero hold only blocks b0..b1-1 (FSDP, see `blocks`)
    """

    data: torch.Tensor
    scales: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    quant_type: str
    block_size: int
    scheme: str = "absmax"
    zero: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    shard: tuple[int, int] | None = None

    # ---- facts -------------------------------------------------------------------------------
    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.data.device

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        return -(-self.numel() // self.block_size)

    def per_block(self) -> dict[str, tuple[int, int]]:
        """{field: (elements per block, elements in all)} of the tensors stored block by block: the codes
        (block_size / 2 bytes a block at 4 bits: 32 at block 64), the scales and min-max zero points (1 each)."""
        per_byte = 8 // codebooks.bits(self.codebook())
        parts = {"data": (self.block_size // per_byte, -(-self.numel() // per_byte)),
                 "scales": (1, self.num_blocks), "zero": (1, self.num_blocks)}
        return {k: v for k, v in parts.items() if getattr(self, k) is not None}

    @property
    def nbytes(self) -> int:
        """Bytes this tensor holds: codes + per-block scales (+ zero points, nested absmax, offset).

        The code books themselves (NF4's 16 values, the 256-value dynamic map) are shared constants and
        not counted.
        """
        parts = (self.data, self.scales, self.zero, self.nested_absmax, self.offset)
        return sum(p.numel() * p.element_size() for p in parts if p is not None)

    @property
    def bits_per_param(self) -> float:
        """8 * nbytes / numel: NF4 at block 64 is 4.5 bits, with double quantization 4.127."""
        return 8 * self.nbytes / self.numel()

    def __repr__(self) -> str:
        dq = "+dq" if self.double_quant else ""
        return (f"QuantizedTensor({self.quant_type}{dq}, {self.scheme}, shape={tuple(self.shape)}, "
                f"block_size={self.block_size}, dtype={self.dtype}, device={self.device}, "
                f"{self.bits_per_param:.3f} bits/param)")

    # ---- shards --------------------------------------------------------------------------------
    def blocks(self, b0: int, b1: int) -> "QuantizedTensor":
        """Blocks b0..b1-1 alone (FSDP's shard of this tensor, tunelab.train.fsdp): copies of their codes, scales
        and zero points, so the whole tensor can be freed. Double quantization's nested absmax (4 bytes per 256
        blocks) and offset stay whole: each shard's scales de-quantize with them as they are. Keeps the whole
        tensor's shape; nbytes counts what it holds; it cannot be de-quantized (`shard` is set)."""
        cut = {k: getattr(self, k)[b0 * per: b1 * per].clone() for k, (per, _) in self.per_block().items()}
        return replace(self, **cut, shard=(b0, b1))

    # ---- conversions -------------------------------------------------------------------------
    def block_scales(self, b0: int = 0, b1: int | None = None) -> torch.Tensor:
        """fp32 scales of blocks b0..b1-1 (default all), undoing double quantization if any."""
        if self.nested_absmax is None:
            return self.scales[b0:b1]
        return blockwise.dequantize_nested(self.scales[b0:b1], self.nested_absmax, self.offset, start=b0)

    def dequantize(self, dtype: torch.dtype | None = None, workspace: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor back in `dtype` (default: the original dtype), computed in fp32 like bitsandbytes.

        workspace: a flat `dtype` tensor of at least numel() + 2 elements on the same device to write
        into (the result is a view of it), e.g. to reuse one buffer across layers.
        The C and Triton kernels that compute the same numbers in one pass are in tunelab.accel (dequant).
        """
        if self.shard is not None:
            raise QuantError(f"this QuantizedTensor holds blocks {self.shard[0]}..{self.shard[1] - 1} of "
                             f"{self.num_blocks} only (an FSDP shard): gather the whole tensor first")
        dtype = dtype or self.dtype
        flat = blockwise.dequantize_blocks(self.data, self.codebook(), self.numel(), self.block_size,
                                           self.block_scales, self.zero, dtype, result=workspace)
        return flat.view(self.shape)

    def codebook(self) -> str:
        """The code book's name: the quant_type, or for min-max codes the uniform levels of their width."""
        return codebooks.LEVELS[self.quant_type] if self.scheme == "minmax" else self.quant_type

    def to(self, device: torch.device | str) -> "QuantizedTensor":
        """A copy on `device` (the same object if it is already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        moved = {k: getattr(self, k).to(device) for k in ("data", "scales", "zero", "nested_absmax", "offset")
                 if getattr(self, k) is not None}
        return replace(self, **moved)

    # ---- bitsandbytes state-dict layout ------------------------------------------------------
    def to_bnb_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The keys bitsandbytes' Linear4bit writes for its weight, under `prefix` (e.g. "layer.0.q.").

        weight (uint8 (ceil(n/2), 1)), weight.absmax, weight.quant_map, [weight.nested_absmax,
        weight.nested_quant_map,] weight.quant_state.bitsandbytes__<nf4|fp4> (JSON bytes of the rest).
        """
        if self.shard is not None:
            raise QuantError("an FSDP shard of a 4-bit weight has no bitsandbytes state dict: gather it first")
        if self.quant_type not in ("nf4", "fp4") or self.scheme != "absmax":
            raise QuantError(f"bitsandbytes' 4-bit layout holds nf4/fp4 absmax only, not {self.quant_type} "
                             f"{self.scheme}; quantize with quant_type='nf4' or 'fp4'")
        key = prefix + "weight"
        meta = {"quant_type": self.quant_type, "blocksize": self.block_size, "dtype": _dtype_name(self.dtype),
                "shape": list(self.shape)}
        sd = {key: self.data.view(-1, 1), f"{key}.absmax": self.scales,
              f"{key}.quant_map": codebooks.code(self.quant_type, self.device).clone()}
        if self.double_quant:
            sd[f"{key}.nested_absmax"] = self.nested_absmax
            sd[f"{key}.nested_quant_map"] = codebooks.dynamic_map(self.device).clone()
            meta.update({"nested_blocksize": blockwise.NESTED_BLOCK, "nested_dtype": "float32",
                         "nested_offset": self.offset.item()})
        # Same JSON text as bitsandbytes' pack_dict_to_tensor (json.dumps defaults), stored as uint8.
        sd[f"{key}.{_BNB_QS}{self.quant_type}"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
        return sd

    @classmethod
    def from_bnb_state_dict(cls, sd: dict[str, torch.Tensor], prefix: str = "") -> "QuantizedTensor":
        """Read the keys `to_bnb_state_dict` / bitsandbytes' Linear4bit write (see there)."""
        key = prefix + "weight"
        qs_keys = [k for k in sd if k.startswith(f"{key}.{_BNB_QS}")]
        if key not in sd or len(qs_keys) != 1:
            raise QuantError(f"no bitsandbytes 4-bit weight under {key!r}: expected {key!r} and one "
                             f"'{key}.{_BNB_QS}<nf4|fp4>' entry")
        meta = json.loads(bytes(sd[qs_keys[0]].cpu().tolist()).decode())
        quant_type = meta["quant_type"]
        book = sd.get(f"{key}.quant_map")
        if quant_type not in ("nf4", "fp4") or (book is not None and not torch.equal(
                book.float().cpu(), codebooks.code(quant_type))):
            raise QuantError(f"{key}: unsupported 4-bit code book {quant_type!r} (tunelab reads nf4 and fp4)")
        data = sd[key].reshape(-1)
        if data.dtype != torch.uint8:  # bitsandbytes' quant_storage may be another dtype over the same bytes
            data = data.view(torch.uint8)
        nested = f"{key}.nested_absmax" in sd
        qt = cls(data=data, scales=sd[f"{key}.absmax"], shape=torch.Size(meta["shape"]),
                 dtype=getattr(torch, meta["dtype"]), quant_type=quant_type, block_size=int(meta["blocksize"]))
        if nested:
            if int(meta["nested_blocksize"]) != blockwise.NESTED_BLOCK:
                raise QuantError(f"{key}: nested block size {meta['nested_blocksize']} is not supported (256 is)")
            qt.nested_absmax = sd[f"{key}.nested_absmax"].float()
            qt.offset = torch.tensor(float(meta["nested_offset"]), device=data.device)
        return qt


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or block_size < MIN_BLOCK or block_size > MAX_BLOCK \
            or block_size & (block_size - 1):
        raise QuantError(f"block size must be a power of two from {MIN_BLOCK} to {MAX_BLOCK}, got {block_size!r}")


def quantize(t: torch.Tensor, quant_type: str = "nf4", block_size: int = 64, double_quant: bool = False,
             scheme: str = "absmax") -> QuantizedTensor:
    """Quantize a float tensor blockwise.

    quant_type: the storage format (t.dtype is the torch dtype it came in and comes back in): "nf4" | "fp4"
    (4-bit code books, absmax only), "int4" | "int8" (linear codes, absmax or minmax). block_size: a power of two in 32..4096. double_quant: store the per-block scales as 8-bit
    codes too (QLoRA). NF4/FP4 absmax output is bit-identical to bitsandbytes' quantize_4bit on CPU.
    """
    if not isinstance(t, torch.Tensor):
        raise QuantError(f"quantize expects a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise QuantError(f"quantize takes float32/float16/bfloat16 tensors, got {t.dtype}; convert with .float()")
    if t.numel() == 0:
        raise QuantError(f"cannot quantize an empty tensor (shape {tuple(t.shape)})")
    if quant_type not in codebooks.QUANT_TYPES:
        raise QuantError(f"unknown quant_type {quant_type!r}; choose one of {', '.join(codebooks.QUANT_TYPES)}")
    if scheme not in SCHEMES:
        raise QuantError(f"unknown scheme {scheme!r}; choose 'absmax' or 'minmax'")
    if scheme == "minmax" and quant_type not in codebooks.INT_LEVELS:
        raise QuantError(f"{quant_type} is an absmax code book; min-max (zero point) works with int4 or int8")
    check_block_size(block_size)
    flat = t.detach().reshape(-1)
    zero = None
    if scheme == "absmax":
        data, scales = blockwise.quantize_absmax(flat, quant_type, block_size)
    else:
        data, scales, zero = blockwise.quantize_minmax(flat, quant_type, block_size)
    qt = QuantizedTensor(data=data, scales=scales, shape=t.shape, dtype=t.dtype, quant_type=quant_type,
                         block_size=block_size, scheme=scheme, zero=zero)
    if double_quant:
        qt.scales, qt.nested_absmax, qt.offset = blockwise.quantize_nested(scales)
    return qt

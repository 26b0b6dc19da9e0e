"""Code books: the few values a low-bit code can stand for, all scaled to [-1, 1].

NF4 and FP4 are bitsandbytes' 4-bit types, value for value and in the same order, so that a 4-bit
index means the same number in both libraries. int4/int8 are the signed linear codes k/7 and k/127.
The dynamic map is bitsandbytes' signed 8-bit "dynamic exponent" type (Dettmers 2015,
arXiv:1511.04561) that QLoRA uses to store the per-block scales in 8 bits (double quantization).
"""

from __future__ import annotations

from functools import lru_cache

import torch

# NF4 (QLoRA, arXiv:2305.14314): quantiles of N(0, 1) normalised to [-1, 1], 8 negative values,
# zero, 7 positive; bitsandbytes' create_normal_map(offset=0.9677083) written out as fp32 literals.
NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# FP4 = 1 sign, 2 exponent, 1 mantissa bit, in bit-pattern order (index i is the 4-bit pattern i):
# 0b0000 = 0, 0b0001 = 0.0625 (subnormal), 0b0010 = 8, ... then the same with the sign bit set.
# Divided by the largest value (12) as bitsandbytes does, so the index order is NOT value order.
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

# Signed linear codes: index i stands for (i - L) / L, L = 7 (int4) or 127 (int8); symmetric, so
# int4 uses 15 of its 16 patterns and int8 255 of 256.
INT_LEVELS = {"int4": 7, "int8": 127}

BITS = {"nf4": 4, "fp4": 4, "int4": 4, "int8": 8}
QUANT_TYPES = tuple(BITS)

# Min-max (zero-point) codes are plain unsigned levels 0 .. 2^bits - 1; these "code books" let the same
# look-up tables turn them into numbers.
LEVELS = {"int4": "uint4", "int8": "uint8"}
LEVEL_BITS = {"uint4": 4, "uint8": 8}


@lru_cache(maxsize=None)
def _code_cpu(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(NF4, dtype=torch.float32)
    if quant_type == "fp4":
        raw = torch.tensor(_FP4_RAW, dtype=torch.float32)
        return raw / raw.abs().max()
    if quant_type in LEVEL_BITS:
        return torch.arange(2 ** LEVEL_BITS[quant_type], dtype=torch.float32)
    if quant_type in INT_LEVELS:
        levels = INT_LEVELS[quant_type]
        return torch.arange(-levels, levels + 1, dtype=torch.float32) / levels
    raise ValueError(f"unknown quant_type {quant_type!r}; choose one of {', '.join(QUANT_TYPES)}")


@lru_cache(maxsize=None)
def _cached(quant_type: str, device: torch.device) -> torch.Tensor:
    return _code_cpu(quant_type).to(device)


def code(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The fp32 code book of `quant_type` ("nf4", "fp4", "int4", "int8"; "uint4"/"uint8" = min-max
    levels 0..15 / 0..255); index = stored code.

    The returned tensor is shared (cached per device): do not modify it in place.
    """
    return _cached(quant_type, torch.device(device))


def bits(name: str) -> int:
    """Bits per code of a quant type or min-max level set."""
    return BITS.get(name) or LEVEL_BITS[name]


@lru_cache(maxsize=None)
def _dynamic_cpu() -> torch.Tensor:
    """bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8), same fp32 bits.

    For exponent e = 0..6 (value range 10^(e-6)), 2^e fraction values in [0.1, 1] (bin centres of a
    linspace), each with both signs; plus 0 and 1. 2 * (1 + 2 + ... + 64) + 2 = 256 values, sorted.
    """
    max_exponent_bits, non_sign_bits = 7, 7
    data: list[float] = []
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        # The power is a Python number times an fp32 tensor, as in bitsandbytes: same rounding.
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


@lru_cache(maxsize=None)
def _dynamic_cached(device: torch.device) -> torch.Tensor:
    return _dynamic_cpu().to(device)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-value signed dynamic 8-bit map used for double quantization (shared: read only)."""
    return _dynamic_cached(torch.device(device))

"""Run tunelab's Triton dequantize kernel under Triton's interpreter on CPU and compare it with the PyTorch path.

Run as a script (tests/accel/test_quant_triton.py does, in a subprocess): TRITON_INTERPRET must be set before
Triton is imported, and a pytest process may already have imported it. Prints one JSON list of
{"case", "equal", "max_abs_diff", "numel"} to stdout.
"""

import json
import os
import sys

if __name__ == "__main__":  # imported (for CASES), it must not switch the importing process to the interpreter
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))  # the checkout's tunelab

import torch

from tunelab.accel import dequant_triton
from tunelab.quant import QuantizedTensor, code, quantize

# (quant_type, block size, double quant, shape, weight dtype, output dtype): odd counts, a short last
# block, more than 256 blocks (two nested absmax groups), every output dtype, the extreme block sizes.
CASES = [
    ("nf4", 64, True, (600 * 64 + 37,), torch.float32, torch.float32),
    ("nf4", 32, False, (1001,), torch.float32, torch.float32),
    ("nf4", 64, True, (7,), torch.float32, torch.float32),
    ("fp4", 128, True, (513 * 128 + 5,), torch.float32, torch.float32),
    ("fp4", 64, False, (96, 200), torch.float32, torch.bfloat16),
    ("int4", 256, False, (40, 333), torch.float32, torch.float16),
    ("nf4", 4096, True, (3 * 4096 + 1,), torch.float32, torch.bfloat16),
    ("nf4", 64, True, (300, 130), torch.bfloat16, torch.bfloat16),
    ("nf4", 64, True, (300, 130), torch.float16, torch.float16),
    ("nf4", 64, True, (1000 * 64 + 38,), torch.float32, torch.bfloat16),  # even, short last block, 4 nested groups
]


def run_case(quant_type, block_size, double_quant, shape, wdtype, odtype, pairs=True) -> dict:
    gen = torch.Generator().manual_seed(block_size + len(shape))
    w = (torch.randn(shape, generator=gen) * torch.rand(shape, generator=gen) ** 3).to(wdtype)  # varied block scales
    qt = quantize(w, quant_type, block_size=block_size, double_quant=double_quant)
    dequant_triton.PAIRS = pairs  # bf16, even counts: the block-tiled kernel, or the per-byte one
    ours = dequant_triton.dequantize_4bit(qt, odtype)
    ref = qt.dequantize(odtype).reshape(-1)  # the PyTorch path (CPU tensors never take the kernel)
    diff = (ours.double() - ref.double()).abs().max().item()
    name = (f"{quant_type}{'+dq' if double_quant else ''} block {block_size} {tuple(shape)} {wdtype}->{odtype}"
            + ("" if pairs else " per-byte kernel"))
    return {"case": name, "equal": ours.dtype == odtype and torch.equal(ours, ref), "max_abs_diff": diff,
            "numel": ours.numel()}


def ties_case(pairs=True) -> dict:
    """bf16 rounding at exact ties (fp32 products whose low 16 bits are 0x8000): to even, as CUDA and PyTorch.

    Random data almost never lands on a tie, so pick block scales s where nf4 value v * s does, found by
    search, and codes that select that v: 64 such blocks, each of 64 equal codes.
    """
    book = code("nf4")
    s = torch.rand(1 << 20, generator=torch.Generator().manual_seed(3)) + 0.5  # (M,) candidate scales
    prod = book[None, :] * s[:, None]  # (M, 16)
    tie = (prod.view(torch.int32) & 0xFFFF) == 0x8000
    rows, cols = tie.nonzero(as_tuple=True)
    rows, cols = rows[:64], cols[:64]
    data = (cols.to(torch.uint8) * 17).repeat_interleave(32)  # both nibbles = the code: 64 values per block
    qt = QuantizedTensor(data=data, scales=s[rows].contiguous(), shape=torch.Size([64 * len(rows)]),
                         dtype=torch.float32, quant_type="nf4", block_size=64)
    dequant_triton.PAIRS = pairs
    ours = dequant_triton.dequantize_4bit(qt, torch.bfloat16)
    ref = qt.dequantize(torch.bfloat16)
    return {"case": f"bf16 ties ({len(rows)} blocks){'' if pairs else ' per-byte kernel'}", "equal": len(rows) == 64 and torch.equal(ours, ref),
            "max_abs_diff": (ours.double() - ref.double()).abs().max().item(), "numel": ours.numel()}


if __name__ == "__main__":
    per_byte = [run_case(*c, pairs=False) for c in CASES if c[5] == torch.bfloat16] + [ties_case(pairs=False)]
    print(json.dumps([run_case(*c) for c in CASES] + [ties_case()] + per_byte))

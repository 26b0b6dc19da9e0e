"""tunelab.quant vs bitsandbytes on this machine's CPU (and CUDA if present), side by side in one process.

    python benchmarks/quant_bench.py [--size 4096] [--repeats 7]

For a size x size fp32 weight: quantize NF4 + double quant, dequantize to fp32; ours and bitsandbytes'
alternate in every repeat and the medians are compared. Also times dequantize of a 576x1536 weight
(SmolLM2's MLP) since that is what a QLoRA step pays per layer.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tunelab.quant as tq


def _time(fn, sync) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def side_by_side(ours, theirs, repeats: int, sync) -> tuple[float, float]:
    """Median seconds of `ours` and `theirs`, alternating (one warm-up each)."""
    ours(), theirs()
    a, b = [], []
    for _ in range(repeats):
        a.append(_time(ours, sync))
        b.append(_time(theirs, sync))
    return statistics.median(a), statistics.median(b)


def run(device: str, size: int, repeats: int) -> None:
    import bitsandbytes.functional as bnbf

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    w = torch.randn(size, size, device=device)
    print(f"\n== {device}: {size}x{size} fp32, torch threads {torch.get_num_threads()}, {repeats} repeats ==")
    q_ours, q_bnb = side_by_side(lambda: tq.quantize(w, "nf4", 64, double_quant=True),
                                 lambda: bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True),
                                 repeats, sync)
    print(f"quantize nf4+dq   ours {q_ours * 1e3:8.1f} ms   bitsandbytes {q_bnb * 1e3:8.1f} ms   "
          f"speed-up {q_bnb / q_ours:5.2f}x")
    qt = tq.quantize(w, "nf4", 64, double_quant=True)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed.view(-1), qt.data), "packed bytes differ from bitsandbytes"
    d_ours, d_bnb = side_by_side(qt.dequantize, lambda: bnbf.dequantize_4bit(packed, state), repeats, sync)
    print(f"dequantize fp32   ours {d_ours * 1e3:8.1f} ms   bitsandbytes {d_bnb * 1e3:8.1f} ms   "
          f"speed-up {d_bnb / d_ours:5.2f}x")
    if device == "cuda":
        copy_s = statistics.median(_time(lambda: w.clone(), sync) for _ in range(repeats))
        nbytes_dq = qt.nbytes + w.numel() * 4  # read packed + state, write fp32
        print(f"copy bandwidth    {2 * w.numel() * 4 / copy_s / 1e12:.2f} TB/s (clone)   "
              f"dequantize ours {nbytes_dq / d_ours / 1e12:.2f} TB/s   bitsandbytes {nbytes_dq / d_bnb / 1e12:.2f} TB/s")
    small = torch.randn(576, 1536, device=device)
    qs = tq.quantize(small, "nf4", 64, double_quant=True)
    ps, ss = bnbf.quantize_4bit(small, blocksize=64, quant_type="nf4", compress_statistics=True)
    s_ours, s_bnb = side_by_side(qs.dequantize, lambda: bnbf.dequantize_4bit(ps, ss), repeats * 5, sync)
    print(f"dequantize 576x1536  ours {s_ours * 1e3:6.2f} ms   bitsandbytes {s_bnb * 1e3:6.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    args = parser.parse_args()
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            print("\n(no CUDA device: GPU numbers skipped)")
            continue
        run(device, args.size, args.repeats)


if __name__ == "__main__":
    main()

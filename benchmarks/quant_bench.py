"""tunelab.quant vs bitsandbytes on this machine's CPU (and CUDA if present), side by side in one process.

    python benchmarks/quant_bench.py [--size 4096] [--repeats 7]

For a size x size fp32 weight: quantize NF4 + double quant, dequantize to fp32; ours and bitsandbytes'
run back to back in every repeat (which goes first alternates), and the ratio is taken within each repeat:
the median ratio, its min-max, and a 90% bootstrap interval of the median (repeats resampled, seed 0), since
the machine's speed drifts over seconds by more than a target's margin (one script gave 3.9x, 6.5x, 7.1x).
Also times dequantize of a 576x1536 weight (SmolLM2's MLP), what a QLoRA step pays per layer. "ours" is
the path a training step takes (tunelab.accel.dequant.matmul_weight: the C kernel into a reused buffer, or
Triton on CUDA); "reference" is its plain-PyTorch twin QuantizedTensor.dequantize into fresh memory. The
script exits non-zero when the bytes or the de-quantized values of the stacks differ.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

import torch

import tunelab.quant as tq
from tunelab.accel.dequant import matmul_weight


def _time(fn, sync) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def side_by_side(ours, theirs, repeats: int, sync) -> tuple[float, float, str]:
    """Median seconds of `ours` and `theirs` (one warm-up each, then pairs in alternating order), and the
    speed-up theirs / ours as the median of the per-pair ratios with its spread."""
    ours(), theirs()
    a, b = [], []
    for k in range(repeats):
        if k % 2:
            b.append(_time(theirs, sync))
            a.append(_time(ours, sync))
        else:
            a.append(_time(ours, sync))
            b.append(_time(theirs, sync))
    return statistics.median(a), statistics.median(b), spread([y / x for x, y in zip(a, b)])


def spread(ratios: list[float], boot: int = 2000) -> str:
    """'median [min-max], 90% interval lo-hi' of per-repeat ratios (bootstrap of the median, seed 0)."""
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(boot))
    return (f"{statistics.median(ratios):5.2f}x [{min(ratios):.2f}-{max(ratios):.2f}], 90% interval "
            f"{meds[int(0.05 * boot)]:.2f}-{meds[int(0.95 * boot) - 1]:.2f}")


def run(device: str, size: int, repeats: int) -> None:
    import bitsandbytes.functional as bnbf

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    w = torch.randn(size, size, device=device)
    cpu = f"{platform.processor() or platform.machine()}, {torch.backends.cpu.get_cpu_capability()}"
    print(f"\n== {device}: {size}x{size} fp32, torch threads {torch.get_num_threads()}, {repeats} repeats; {cpu} ==")
    q_ours, q_bnb, q_ratio = side_by_side(lambda: tq.quantize(w, "nf4", 64, double_quant=True),
                                 lambda: bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True),
                                 repeats, sync)
    print(f"quantize nf4+dq   ours {q_ours * 1e3:8.1f} ms   bitsandbytes {q_bnb * 1e3:8.1f} ms   speed-up {q_ratio}")
    qt = tq.quantize(w, "nf4", 64, double_quant=True)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed.view(-1), qt.data), "packed bytes differ from bitsandbytes"
    reference = qt.dequantize()
    assert torch.equal(matmul_weight(qt, torch.float32), reference), "kernel differs from its reference twin"
    assert torch.allclose(bnbf.dequantize_4bit(packed, state), reference, rtol=1e-6, atol=1e-6), \
        "de-quantized values differ from bitsandbytes"
    d_ours, d_bnb, d_ratio = side_by_side(lambda: matmul_weight(qt, torch.float32),
                                          lambda: bnbf.dequantize_4bit(packed, state), repeats, sync)
    print(f"dequantize fp32   ours {d_ours * 1e3:8.1f} ms   bitsandbytes {d_bnb * 1e3:8.1f} ms   speed-up {d_ratio}")
    _, r_ref, r_ratio = side_by_side(lambda: matmul_weight(qt, torch.float32), qt.dequantize, repeats, sync)
    print(f"  (reference twin {r_ref * 1e3:8.1f} ms: kernel speed-up over it {r_ratio})")
    if device == "cuda":
        copy_s = statistics.median(_time(lambda: w.clone(), sync) for _ in range(repeats))
        nbytes_dq = qt.nbytes + w.numel() * 4  # read packed + state, write fp32
        print(f"copy bandwidth    {2 * w.numel() * 4 / copy_s / 1e12:.2f} TB/s (clone)   "
              f"dequantize ours {nbytes_dq / d_ours / 1e12:.2f} TB/s   bitsandbytes {nbytes_dq / d_bnb / 1e12:.2f} TB/s")
    small = torch.randn(576, 1536, device=device)
    qs = tq.quantize(small, "nf4", 64, double_quant=True)
    ps, ss = bnbf.quantize_4bit(small, blocksize=64, quant_type="nf4", compress_statistics=True)
    s_ours, s_bnb, s_ratio = side_by_side(lambda: matmul_weight(qs, torch.float32),
                                          lambda: bnbf.dequantize_4bit(ps, ss), repeats * 5, sync)
    print(f"dequantize 576x1536  ours {s_ours * 1e3:6.2f} ms   bitsandbytes {s_bnb * 1e3:6.2f} ms   speed-up {s_ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=15)
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

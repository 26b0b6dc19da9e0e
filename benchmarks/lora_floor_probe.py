"""Where a LoRA/QLoRA step's time can still go down on this CPU: kernel-level probes, side by side.

    python benchmarks/quiet.py python benchmarks/lora_floor_probe.py [--reps 40]

Each probe times two ways of computing the same thing on SmolLM2-135M's layer shapes (1024 tokens =
batch 4 x 256, r=16, fp32), alternating A, B, A, B ... in one process, and prints the median over
pairs of time(A) / time(B): above 1 means B is faster. Rates are in GFLOP/s. Issue 8's notes in
docs/lora.md cite the output.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

T, D, FF, KV, R = 1024, 576, 1536, 192, 16  # tokens; hidden; MLP; k/v width; LoRA rank
HEADS, KV_HEADS, SEQ, HEAD_DIM = 9, 3, 256, 64


def paired(a, b, reps: int) -> tuple[float, float, float]:
    """Median ms of a, of b, and the median of time(a)/time(b) over alternating pairs."""
    a(), b()
    ta, tb = [], []
    for i in range(reps):
        for fn, acc in ((a, ta), (b, tb)) if i % 2 else ((b, tb), (a, ta)):
            t = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t)
    ratio = statistics.median(x / y for x, y in zip(ta, tb))
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3, ratio


def row(name: str, a: str, b: str, res: tuple[float, float, float]) -> None:
    print(f"{name:<34} {a:<22} {res[0]:7.2f} ms | {b:<26} {res[1]:7.2f} ms | A/B {res[2]:.3f}", flush=True)


def gemm_rates(reps: int) -> None:
    print("GEMM rate (forward x @ W^T; input-gradient g @ W), the floor of every linear:")
    big = torch.randn(2048, 2048)
    ms = paired(lambda: big @ big, lambda: big @ big, reps)[0]
    print(f"  2048^3 square: {2 * 2048 ** 3 / ms / 1e6:.0f} GFLOP/s")
    for out_f, in_f in ((FF, D), (D, FF), (D, D), (KV, D)):
        x, w, g = torch.randn(T, in_f), torch.randn(out_f, in_f), torch.randn(T, out_f)
        fwd, bwd, _ = paired(lambda: x @ w.t(), lambda: g @ w, reps)
        flop = 2 * T * out_f * in_f / 1e6
        print(f"  W {out_f}x{in_f}: forward {flop / fwd:.0f} GFLOP/s, input gradient {flop / bwd:.0f} GFLOP/s")


def gate_up_fused(reps: int) -> None:
    x, wg, wu = torch.randn(T, D), torch.randn(FF, D), torch.randn(FF, D)
    dg, du = torch.randn(T, FF), torch.randn(T, FF)
    wgu, dgu = torch.cat([wg, wu]), torch.cat([dg, du], 1)

    def separate():
        x @ wg.t(), x @ wu.t()
        (dg @ wg).addmm_(du, wu)

    def fused():
        x @ wgu.t()
        dgu @ wgu

    row("gate+up: 2 GEMMs or 1 (fwd+bwd)", "A: two 1536-wide", "B: one 3072-wide", paired(separate, fused, reps))


def merged_weight(reps: int) -> None:
    """LoRA as two paths (ours: x W^T + s (x A^T) B^T) or as one GEMM with W + s B A rebuilt per use."""
    s = 2.0
    for out_f, in_f in ((FF, D), (D, FF), (D, D)):
        x, w, g = torch.randn(T, in_f), torch.randn(out_f, in_f), torch.randn(T, out_f)
        a, b, ws = torch.randn(R, in_f), torch.randn(out_f, R), torch.empty(out_f, in_f)

        def two_paths():
            u = x @ a.t()
            (x @ w.t()).addmm_(u, b.t(), alpha=s)
            v = g @ b
            (g @ w).addmm_(v, a, alpha=s)
            v.t() @ x, g.t() @ u

        def merged():
            torch.addmm(w, b, a, alpha=s, out=ws)
            u = x @ a.t()
            x @ ws.t()
            torch.addmm(w, b, a, alpha=s, out=ws)
            v = g @ b
            g @ ws
            v.t() @ x, g.t() @ u

        row(f"LoRA {out_f}x{in_f} fwd+bwd", "A: two paths (ours)", "B: W + sBA per use", paired(two_paths, merged, reps))


def packed_weights(reps: int) -> None:
    for out_f, in_f in ((FF, D), (D, FF)):
        x, w = torch.randn(T, in_f), torch.randn(out_f, in_f)
        try:
            packed = torch.ops.mkl._mkl_reorder_linear_weight(w, T)
        except (RuntimeError, AttributeError) as e:
            print(f"MKL packed weights: not in this torch ({e})")
            return
        res = paired(lambda: x @ w.t(), lambda: torch.ops.mkl._mkl_linear(x, packed, w, None, T), reps)
        row(f"forward {out_f}x{in_f}", "A: x @ W^T", "B: MKL pre-packed W", res)


def attention(reps: int) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(4, HEADS, SEQ, HEAD_DIM, requires_grad=True)
    k, v = (torch.randn(4, KV_HEADS, SEQ, HEAD_DIM, requires_grad=True) for _ in range(2))
    go = torch.randn(4, HEADS, SEQ, HEAD_DIM)

    def run():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(go)

    def math():
        with sdpa_kernel(SDPBackend.MATH):
            run()

    res = paired(run, math, reps)
    flop = 2 * 2 * 4 * HEADS * SEQ * SEQ * HEAD_DIM * 3 / 2 / 1e6  # QK^T and PV; fwd + bwd = 3x fwd; causal half
    row("causal attention fwd+bwd (1 layer)", "A: SDPA flash (used)", "B: SDPA math", res)
    print(f"  flash: {flop / res[0]:.0f} GFLOP/s on the causal half")


def dequant(reps: int) -> None:
    from tunelab.accel import dequant, dequant_c
    from tunelab.quant import quantize

    lib = dequant_c._lib if dequant_c.available() else None
    for out_f, in_f in ((FF, D), (D, D)):
        w = torch.randn(out_f, in_f)
        q = quantize(w, "nf4", block_size=64, double_quant=True)
        speedup = dequant.Dequant()  # as train.kernels=auto applies it to a model
        buf = speedup.workspace(q, torch.float32)

        def with_kernel(on: bool):
            def run():
                dequant_c._lib = lib if on else None
                speedup(q, torch.float32)  # into buf: the kernel, or PyTorch's ops without it
            return run

        copy = paired(lambda: buf[: w.numel()].copy_(w.view(-1)), lambda: None, reps)[0]
        if lib is None:
            print(f"NF4 dequantize {out_f}x{in_f}: no C compiler, PyTorch path only")
            continue
        res = paired(with_kernel(False), with_kernel(True), reps)
        row(f"NF4 dequantize {out_f}x{in_f}", "A: PyTorch ops", "B: C kernel (used)", res)
        print(f"  (an fp32 copy of the same size: {copy:.2f} ms)")
    dequant_c._lib = lib


def qlora_layer(reps: int) -> None:
    """One QLoRA layer's forward + backward (W de-quantized twice), the kernel off and on."""
    from tunelab.accel import dequant, dequant_c, lora
    from tunelab.lora import LoRALinear
    from tunelab.quant import Linear4bit

    if not dequant_c.available():
        return
    lib = dequant_c._lib
    for out_f, in_f in ((FF, D), (D, FF), (D, D)):
        base = Linear4bit.from_linear(torch.nn.Linear(in_f, out_f, bias=False))
        base.dequant = dequant.Dequant()  # as train.kernels=auto applies it
        layer = LoRALinear(base, R, 2 * R)
        layer.kernel = lora.fused_forward
        x, g = torch.randn(T, in_f, requires_grad=True), torch.randn(T, out_f)

        def with_kernel(on: bool):
            def run():
                dequant_c._lib = lib if on else None
                layer(x).backward(g)
            return run

        row(f"QLoRA layer {out_f}x{in_f} fwd+bwd", "A: PyTorch dequantize", "B: C kernel (used)",
            paired(with_kernel(False), with_kernel(True), reps))
    dequant_c._lib = lib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=40, help="pairs per probe")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}")
    with torch.no_grad():
        gemm_rates(args.reps)
        gate_up_fused(args.reps)
        merged_weight(args.reps)
        packed_weights(args.reps)
        dequant(args.reps)
    qlora_layer(args.reps)
    attention(args.reps // 2)


if __name__ == "__main__":
    main()

"""One AdamW step over the LoRA parameters of the bundled model (r=16 on all linears: 420 tensors, 4.9 M
values): torch's foreach (default), per-tensor loop and fused kernels, alternating, median of N steps each.

    python benchmarks/quiet.py python benchmarks/adamw_step.py --repeats 21

tunelab's training loop uses the fused kernel (tunelab/train/loop.py). Shapes from SmolLM2-135M (hidden 576,
MLP 1536, k/v 192, 30 layers); the values are random, which does not change an elementwise update's time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

LINEARS = ((576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576))  # (in, out)
KINDS = {"foreach (default)": {"foreach": True}, "per-tensor loop": {"foreach": False}, "fused": {"fused": True}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--layers", type=int, default=30)
    args = ap.parse_args()
    shapes = [s for _ in range(args.layers) for i, o in LINEARS for s in ((args.r, i), (o, args.r))]
    opts = {}
    for name, kw in KINDS.items():
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        opts[name] = torch.optim.AdamW(params, lr=1e-4, **kw)
        opts[name].step()  # allocates the moments
    times = {name: [] for name in KINDS}
    for _ in range(args.repeats):
        for name, opt in opts.items():
            t = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t)
    n = sum(torch.Size(s).numel() for s in shapes)
    print(f"{len(shapes)} tensors, {n / 1e6:.2f} M values, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} steps:")
    for name, ts in times.items():
        print(f"  {name:18s} {statistics.median(ts) * 1e3:7.1f} ms")


if __name__ == "__main__":
    main()

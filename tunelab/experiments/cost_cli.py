"""`tunelab cost MODEL --method full lora qlora --batch-size 4 --seq-len 256 [--measure]`: what each method
costs (parameters, memory by kind, FLOPs per token) before you launch it; `--measure` runs a few real steps."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("model", help="`bundled`, a Hugging Face model folder, or a .gguf file")
    p.add_argument("--method", nargs="+", default=["full", "lora", "qlora"], choices=["full", "lora", "qlora"])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (all-linear targets)")
    p.add_argument("--quant-block", type=int, default=64, help="qlora: 4-bit block size")
    p.add_argument("--no-double-quant", action="store_true", help="qlora: fp32 block scales")
    p.add_argument("--loss-chunk", type=int, default=256, help="label tokens per chunk of the output head")
    p.add_argument("--measure", action="store_true", help="also run a few real steps per method (fresh process)")
    p.add_argument("--steps", type=int, default=3, help="measured steps after one warm-up step")
    p.add_argument("--allocator", choices=["loop", "fixed", "glibc"], default="loop",
                   help="--measure's malloc setting: loop (tunelab train's: keeps freed blocks for the next step), "
                        "fixed (64 KiB mmap threshold: resident memory follows live tensors) or glibc (its defaults); "
                        "the live-tensor peak does not depend on it (docs/experiments.md)")
    p.add_argument("--json", help="also write the rows to this JSON file")


def _mb(x: float) -> str:
    return f"{x / 2**20:,.1f}"


def run(args) -> int:
    import json
    from types import SimpleNamespace

    from transformers import AutoConfig

    from tunelab.accel import kernels
    from tunelab.errors import TunelabError
    from tunelab.experiments.cost import Arch, Setup, analytic, measure
    from tunelab.models.load import model_folder
    from tunelab.quant.tensor import check_block_size

    for flag in ("batch_size", "seq_len", "rank", "loss_chunk", "steps"):
        if getattr(args, flag) < 1:
            raise TunelabError(f"--{flag.replace('_', '-')} must be 1 or more, got {getattr(args, flag)}")
    check_block_size(args.quant_block)
    hf_config = AutoConfig.from_pretrained(model_folder(args.model))
    arch = Arch.from_hf(hf_config)
    chosen = kernels.choose(SimpleNamespace(config=hf_config), "auto", "cpu")  # as tunelab train on this CPU
    rows = []
    for method in args.method:
        s = Setup(method, args.batch_size, args.seq_len, args.rank, args.quant_block, not args.no_double_quant,
                  args.loss_chunk, fused=chosen.norm and chosen.swiglu)
        row = analytic(arch, s)
        if args.measure:
            m = measure(args.model, s, args.steps, allocator=args.allocator)
            row |= {"live_peak": m["live_peak"], "live_ratio": m["live_peak"] / row["peak"],
                    "measured_peak": m["peak"], "peak_ratio": m["peak"] / row["peak"],
                    "tokens_per_s": m["tokens_per_s"], "allocator": m["allocator"]}
        rows.append(row)
    print(f"{args.model}: {arch.layers} layers, hidden {arch.hidden}, {arch.total_params() / 1e6:.1f}M params; "
          f"batch {args.batch_size} x seq {args.seq_len}; MiB (2^20 bytes), fp32")
    head = ["method", "trainable", "weights", "grads", "AdamW", "activations", "loss bufs", "peak (analytic)",
            "GFLOP/token"] + (["live peak (measured)", "live/analytic", f"RSS peak ({args.allocator} malloc)",
                                "RSS/analytic", "tokens/s"] if args.measure else [])
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        cells = [r["method"], f"{r['trainable']:,}", _mb(r["weights"]), _mb(r["grads"]), _mb(r["optimizer"]),
                 _mb(r["activations"]), _mb(r["loss_buffers"]), _mb(r["peak"]), f"{r['flops_per_token'] / 1e9:.3f}"]
        if args.measure:
            cells += [_mb(r["live_peak"]), f"{r['live_ratio']:.3f}", _mb(r["measured_peak"]), f"{r['peak_ratio']:.3f}",
                      f"{r['tokens_per_s']:.0f}"]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0

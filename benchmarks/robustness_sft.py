"""Robustness SFT against prompt injection on the bundled model: LoRA on documents whose right answer
ignores the injection, then the injection suite on new documents, base vs tuned, in one process.

python benchmarks/robustness_sft.py [--train-docs 40] [--eval-docs 8] [--steps 40] [--batch-size 8] [--lr 5e-4] [--threads 1]
Train: `robust_sft_examples` of the TRAIN_STYLES (direct, roleplay, hidden-json) + clean twins, seed 300.
Eval: `make_items` of every style, seed 1234 (the `tunelab eval --suite injection` default).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main() -> None:
    from tunelab.config import TrainConfig
    from tunelab.data.sft import tokenize_sft
    from tunelab.eval import injection as J
    from tunelab.eval.suites import run_injection
    from tunelab.lora import LoraConfig, apply_lora, lora_param_groups
    from tunelab.models.load import load_pretrained
    from tunelab.train.loop import train_loop

    ap = argparse.ArgumentParser()
    ap.add_argument("--train-docs", type=int, default=40)
    ap.add_argument("--eval-docs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", help="write the metrics as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_pretrained("bundled")
    base = run_injection(model, tok, args.eval_docs, 1234, 16)

    train = [tokenize_sft(ex, tok, 384) for ex in J.robust_sft_examples(args.train_docs, 300, J.TRAIN_STYLES)]
    apply_lora(model, LoraConfig(r=16, alpha=32, target_modules="all-linear"))
    cfg = TrainConfig(lr=args.lr, batch_size=args.batch_size, max_steps=args.steps, warmup_steps=2, log_every=1,
                      device="cpu")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        summary = train_loop(model, train, [], cfg, Path(out), param_groups=lora_param_groups(model, args.lr),
                             pad_id=tok.pad_token_id, progress=True)
    train_s = time.perf_counter() - t0
    tuned = run_injection(model, tok, args.eval_docs, 1234, 16)

    print(f"\ntrain: {len(train)} examples ({', '.join(J.TRAIN_STYLES)} + clean, seed 300), LoRA r=16 all-linear, "
          f"{args.steps} steps x {args.batch_size}, lr {args.lr}, loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}, "
          f"{train_s:.0f} s")
    print(f"eval: {args.eval_docs} new documents (seed 1234) x (clean + {len(J.STYLES)} styles)\n")
    print("| metric | base | robust SFT | change |\n|---|---|---|---|")
    for name, b in base["metrics"].items():
        a = tuned["metrics"][name]
        held = " (held-out style)" if any(name.endswith(s) for s in J.HELDOUT_STYLES) else ""
        print(f"| {name}{held} | {b:.3f} | {a:.3f} | {a - b:+.3f} |")
    print(f"| items/s | {base['items_per_s']:.2f} | {tuned['items_per_s']:.2f} | |")
    if args.out:
        Path(args.out).write_text(json.dumps({"base": base, "tuned": tuned, "train": summary}, indent=1, default=str))


if __name__ == "__main__":
    main()

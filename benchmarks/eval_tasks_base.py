"""Base-model accuracy per task family and generation speed on the bundled SmolLM2-135M-Instruct.

python benchmarks/eval_tasks_base.py [--n 20] [--seed 1234] [--batch-size 16] [--threads 1]
Prints a Markdown table (family, split, accuracy) and items/s of batched greedy generation.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.eval.tasks import FAMILIES, HELDOUT_FAMILIES, TRAIN_FAMILIES, evaluate_items, generate_items
    from tunelab.models.bundled import model_dir

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(model_dir())
    model = AutoModelForCausalLM.from_pretrained(model_dir(), dtype=torch.float32)
    items = generate_items(TRAIN_FAMILIES + HELDOUT_FAMILIES, args.n, args.seed)
    t0 = time.perf_counter()
    r = evaluate_items(model, tok, items, batch_size=args.batch_size)
    print(f"| family | group | split | accuracy (n={args.n}) | example output |")
    print("|---|---|---|---|---|")
    for fam in TRAIN_FAMILIES + HELDOUT_FAMILIES:
        split = "train" if fam in TRAIN_FAMILIES else "held-out"
        example = next(o for o, it in zip(r["outputs"], items) if it.family == fam)
        example = example.replace("\n", "\\n").replace("|", "\\|")[:60]
        print(f"| {fam} | {FAMILIES[fam].group} | {split} | {r['per_family'][fam]:.2f} | `{example}` |")
    mean = lambda fs: sum(r["per_family"][f] for f in fs) / len(fs)  # noqa: E731
    print(f"\ntrain families mean {mean(TRAIN_FAMILIES):.3f}, held-out families mean {mean(HELDOUT_FAMILIES):.3f}")
    print(f"{r['n']} items in {r['seconds']:.1f} s = {r['items_per_s']:.2f} items/s "
          f"(batch {args.batch_size}, {args.threads} threads, greedy, KV cache; total with scoring {time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()

"""Train the injected-span detector on the bundled model (train styles) and score it on held-out styles.

python benchmarks/span_detector.py [--steps 40] [--batch-size 4] [--lr 1e-3] [--layers 8] [--train-docs 60] [--eval-docs 20] [--gap 3]
Train: documents with injections in the TRAIN_STYLES (direct, roleplay, hidden-json) plus their clean twins.
Eval: new documents (another seed) with HELDOUT_STYLES (hidden-code-comment, multilingual) plus clean twins.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main() -> None:
    from transformers import AutoTokenizer

    from tunelab.eval import injection as J
    from tunelab.eval.spans import close_gaps, predict, span_metrics, token_classifier, token_labels, train_detector
    from tunelab.models.bundled import model_dir

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--layers", type=int, default=8, help="keep the first k of the model's 30 layers (0: all)")
    ap.add_argument("--train-docs", type=int, default=60)
    ap.add_argument("--eval-docs", type=int, default=20)
    ap.add_argument("--gap", type=int, default=3, help="also report spans after closing gaps of <= gap tokens")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", help="write the metrics as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(model_dir())
    model = token_classifier(model_dir(), lora_r=8, lora_alpha=16, layers=args.layers or None)
    train = J.make_items(args.train_docs, seed=100, styles=J.TRAIN_STYLES)
    test = J.make_items(args.eval_docs, seed=200, styles=J.HELDOUT_STYLES)
    t0 = time.perf_counter()
    losses = train_detector(model, tok, train, steps=args.steps, batch_size=args.batch_size, lr=args.lr, log_every=5)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = predict(model, tok, test)
    pred_s = time.perf_counter() - t0
    gold = [token_labels(tok, it)[1] for it in test]

    def on(styles, gap):  # metrics on the items of these styles plus the clean twins (false positives count)
        keep = [i for i, it in enumerate(test) if it.meta["style"] in styles or it.meta["style"] is None]
        return span_metrics([close_gaps(pred[i], gap) for i in keep], [gold[i] for i in keep])

    results = {f"{name}, gaps <= {gap} closed" if gap else name: on(styles, gap)
               for gap in (0, args.gap) for name, styles in
               [("all held-out styles", J.HELDOUT_STYLES)] + [(s, [s]) for s in J.HELDOUT_STYLES]}
    print(f"\ntrain: {len(train)} items ({', '.join(J.TRAIN_STYLES)} + clean, seed 100), first {args.layers or 30} "
          f"layers, LoRA r=8 + score head, {args.steps} steps x {args.batch_size}, lr {args.lr}, "
          f"loss {sum(losses[:5]) / 5:.4f} -> {sum(losses[-5:]) / 5:.4f} (mean of 5 steps), {train_s:.0f} s")
    print(f"eval: {len(test)} items, seed 200: held-out styles ({', '.join(J.HELDOUT_STYLES)}) + clean twins\n")
    print("| eval set (+ clean twins) | token P | token R | token F1 | span P | span R | span F1 |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        t, sp = r["token"], r["span"]
        print(f"| {name} | {t['precision']:.3f} | {t['recall']:.3f} | {t['f1']:.3f} | "
              f"{sp['precision']:.3f} | {sp['recall']:.3f} | {sp['f1']:.3f} |")
    print(f"\ndetector speed: {len(test) / pred_s:.1f} documents/s ({args.threads} threads)")
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "losses": losses, "pred": pred, "gold": gold}))


if __name__ == "__main__":
    main()

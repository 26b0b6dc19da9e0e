"""`tunelab quickstart`: QLoRA on the bundled SmolLM2-135M-Instruct, with held-out quality before and after.

The data is a few hundred verifiable instruction pairs from tunelab's task families (tunelab.eval.tasks),
written to JSONL and trained through the same config, data path and loop as `tunelab train`. Quality is
measured on items never trained on: new items of the trained families (the headline number), and whole
families never trained on (transfer to unseen instructions of a familiar kind).
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--out", default=None, help="run folder (default: a new runs/quickstart-<UTC time>)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--method", choices=["qlora", "lora"], default="qlora")
    p.add_argument("--train-per-family", type=int, default=32, help="training pairs per trained family")
    p.add_argument("--eval-per-family", type=int, default=8, help="held-out items per family")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (for a smoke test)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--model", default="bundled", help="model source (default: the bundled SmolLM2-135M-Instruct)")


def _write_jsonl(path: Path, items) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(it.to_sft()) + "\n" for it in items))


def _table(rows: list[tuple], header: tuple) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def run(args) -> int:
    import torch

    from tunelab.config import load_config
    from tunelab.errors import TunelabError
    from tunelab.eval.tasks import HELDOUT_FAMILIES, TRAIN_FAMILIES, evaluate_items, generate_items
    from tunelab.train.run import build_model, pick_device, run_training

    from tunelab.train import outdir

    t_start = time.time()
    overrides = [f"method={args.method}", f"model.source={args.model}", f"train.lr={args.lr}",
                 f"train.epochs={args.epochs}"]
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    cfg = load_config(None, overrides, base=QUICKSTART)  # a bad flag fails here, before anything is written
    if args.out is not None:
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise TunelabError(f"--out {args.out} is a file; give a folder for the run")
        replaced = outdir.check_free(Path(args.out), resume=False, overwrite=args.overwrite)

    train_items = generate_items(TRAIN_FAMILIES, args.train_per_family, seed=1)
    seen = {it.prompt for it in train_items}
    test_items = [it for it in generate_items(TRAIN_FAMILIES, args.eval_per_family, seed=2) if it.prompt not in seen]
    unseen_items = generate_items(HELDOUT_FAMILIES, args.eval_per_family, seed=2)

    torch.manual_seed(cfg.train.seed)
    model, tok = build_model(cfg, pick_device(cfg.train.device))  # a bad --model fails here, before any file
    if args.out is None:
        out = outdir.new_run_dir("quickstart")
        outdir.point_latest(out)
    else:
        out = Path(args.out)
        outdir.clear(out, replaced)
    cfg.output_dir = str(out)
    _write_jsonl(out / "data" / "train.jsonl", train_items)
    _write_jsonl(out / "data" / "eval.jsonl", test_items)
    cfg.data.sources[0].path = str(out / "data" / "train.jsonl")
    cfg.data.eval_path = str(out / "data" / "eval.jsonl")
    print(f"\n[1/3] before: {len(test_items)} held-out items of trained families, {len(unseen_items)} of unseen ones")
    before = {"test": evaluate_items(model, tok, test_items), "unseen": evaluate_items(model, tok, unseen_items),
              "eval_loss": _eval_loss(model, tok, cfg)}

    print(f"\n[2/3] {args.method} on {len(train_items)} instruction pairs ({', '.join(TRAIN_FAMILIES)})")
    summary, model = run_training(cfg, model=(model, tok))

    print("\n[3/3] after")
    after = {"test": evaluate_items(model, tok, test_items), "unseen": evaluate_items(model, tok, unseen_items)}

    rows = [("held-out items, trained families (exact match)", before["test"]["accuracy"], after["test"]["accuracy"]),
            ("unseen families (transfer)", before["unseen"]["accuracy"], after["unseen"]["accuracy"])]
    rows = [(name, f"{b:.1%}", f"{a:.1%}", f"{a - b:+.1%}") for name, b, a in rows]
    b, a = before["eval_loss"], summary["eval_loss"]
    rows.append(("held-out response loss (nats/token)", f"{b:.3f}", f"{a:.3f}", f"{a - b:+.3f}"))
    fam_rows = [(f, f"{before[k]['per_family'][f]:.0%}", f"{after[k]['per_family'][f]:.0%}")
                for k, fams in (("test", TRAIN_FAMILIES), ("unseen", HELDOUT_FAMILIES)) for f in fams]
    examples = []
    for i in range(0, len(test_items), max(1, len(test_items) // 4))[:4]:
        it = test_items[i]
        examples.append(f"- prompt: {it.prompt!r}\n  expected: {it.answer!r}\n"
                        f"  before:   {before['test']['outputs'][i]!r}\n  after:    {after['test']['outputs'][i]!r}")
    report = "\n\n".join([
        f"# tunelab quickstart: {args.method} on {cfg.model.source}",
        _table(rows, ("metric", "before", "after", "change")),
        _table(fam_rows, ("family", "before", "after")),
        "Generations (greedy):\n" + "\n".join(examples),
        f"Training: {summary['steps']} steps, loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}, "
        f"{summary['seconds']:.0f} s; adapter: {summary['output']}; loss plot: {out / 'loss.png'}; "
        f"total time {time.time() - t_start:.0f} s.",
    ])
    (out / "quickstart.md").write_text(report + "\n")
    (out / "quickstart.json").write_text(json.dumps({"before": {**_strip(before), "eval_loss": b},
                                                      "after": {**_strip(after), "eval_loss": a},
                                                      "train": summary}, indent=1))
    print("\n" + report)
    return 0


def _eval_loss(model, tok, cfg) -> float:
    """The held-out loss before training, on the batches the training loop evaluates after it (same data
    build, seed, batch size and eval_batches). For qlora the model is already 4-bit: the loop's start."""
    from tunelab.data import build_datasets
    from tunelab.train.loop import evaluate_loss

    _, eval_set = build_datasets(cfg.data, tok, cfg.train.seq_len, cfg.train.seed)
    return evaluate_loss(model, eval_set, cfg.train.batch_size, tok.pad_token_id, next(model.parameters()).device,
                         cfg.train.loss_chunk_tokens, cfg.train.eval_batches)


def _strip(results: dict) -> dict:
    return {k: {m: v[m] for m in ("accuracy", "per_family", "outputs", "items_per_s")}
            for k, v in results.items() if k != "eval_loss"}


# The quickstart's run config (paths are filled in at run time); `tunelab train` accepts the same keys.
QUICKSTART = {
    "method": "qlora",
    "model": {"source": "bundled"},
    "quant": {"dtype": "nf4", "block_size": 64, "double_quant": True},
    "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
    "data": {"task": "sft", "sources": [{"name": "tasks", "path": "train.jsonl", "kind": "instructions"}],
             "packing": "padded", "eval_path": "eval.jsonl"},
    "train": {"batch_size": 8, "epochs": 1, "lr": 1e-3, "warmup_steps": 4, "seq_len": 256, "log_every": 1},
}

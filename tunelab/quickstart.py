"""`tunelab quickstart`: QLoRA on the bundled SmolLM2-135M-Instruct, with held-out quality before and after.

The data is a few hundred verifiable instruction pairs from tunelab's task families (tunelab.eval.tasks),
written to JSONL and trained through the same config, data path and loop as `tunelab train`. Quality is
measured on items never trained on: new items of the trained families (the headline number), and whole
families never trained on: the `instruct` collection's 11 held-out families (transfer to unseen tasks;
docs/instruction-tuning.md measures the same on larger runs). Every change is paired over the same items,
with its interval.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tunelab.eval.injection import STYLES
from tunelab.eval.stats import BASELINE_NOTE, bootstrap_interval, exact, interval, mean

EVAL_PER_FAMILY = 10
UNSEEN_PER_FAMILY = 4  # x 11 families: 44 items; their answers are longer than the old 70 items' (the time budget)
CHECK_N = 6


def add_arguments(p) -> None:
    p.add_argument("--out", default=None, help="run folder (default: a new runs/quickstart-<UTC time>)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--method", choices=["qlora", "lora"], default="qlora")
    p.add_argument("--train-per-family", type=int, default=32, help="training pairs per trained family")
    p.add_argument("--eval-per-family", type=int, default=EVAL_PER_FAMILY,
                   help=f"held-out items per trained family (default {EVAL_PER_FAMILY})")
    p.add_argument("--unseen-per-family", type=int, default=UNSEEN_PER_FAMILY,
                   help=f"items per unseen family (11 families; default {UNSEEN_PER_FAMILY})")
    p.add_argument("--check-n", type=int, default=CHECK_N,
                   help=f"size of the cost checks: injection documents (x {len(STYLES)} attacks) and unknown-fact "
                        f"questions / 2 (default {CHECK_N})")
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


def _pct(v: float, ci=None) -> str:
    return f"{v:.1%}" + (f" [{ci[0]:.1%}, {ci[1]:.1%}]" if ci else "")


def _rate_row(name: str, before: list[float], after: list[float], baseline: list[float] | None = None) -> tuple:
    """(name, before [CI], after [CI], change [CI], baseline) of per-item scores of the same items: the
    before/after intervals are stats.interval's, the change's the bootstrap of the paired differences."""
    b, a = mean(before), mean(after)
    lo, hi = bootstrap_interval([y - x for x, y in zip(before, after)])
    return (name, _pct(b, interval(before)), _pct(a, interval(after)), f"{a - b:+.1%} [{lo:+.1%}, {hi:+.1%}]",
            _pct(mean(baseline)) if baseline is not None else "")


def unseen_families() -> list[str]:
    """The families of the "unseen" rows: the instruct collection's held-out ones (one per skill group, none
    among the quickstart's trained families)."""
    from tunelab.eval.tasks import collection

    return collection("instruct")[1]


class _Clock:
    """Wall and CPU seconds of each phase and in total. CPU time (this process, all its threads) is what a
    phase costs even on a shared machine, where its wall time depends on the other load."""

    def __init__(self):
        self.start = self.last = (time.time(), time.process_time())
        self.seconds: dict[str, tuple[float, float]] = {}

    def lap(self, name: str) -> None:
        now = (time.time(), time.process_time())
        self.seconds[name] = (now[0] - self.last[0], now[1] - self.last[1])
        self.last = now

    def table(self) -> dict[str, tuple[float, float]]:
        """{phase: (wall, cpu)} and the total up to the last lap."""
        return {**self.seconds, "total": (self.last[0] - self.start[0], self.last[1] - self.start[1])}


def _measure(model, tok, sets: dict, prose: list[str]) -> dict:
    """Every quality and cost measurement of one model: {"test", "unseen"} task results (evaluate_items),
    the generations of the cost checks with their per-item outcomes ("attack_hits": 1.0 when an attack
    succeeded, "abstained": 1.0 when the model said it does not know) and the held-out prose perplexity."""
    from tunelab.eval import hallucination as H
    from tunelab.eval import injection as J
    from tunelab.eval.perplexity import perplexity
    from tunelab.eval.tasks import answer_items, evaluate_items

    out = {k: evaluate_items(model, tok, sets[k]) for k in ("test", "unseen")}
    out["injection"] = answer_items(model, tok, sets["injection"], max_new_tokens=40)  # the suite's budgets
    out["hallucination"] = answer_items(model, tok, sets["hallucination"], max_new_tokens=24)
    hits = J.score_injection(sets["injection"], out["injection"]["outputs"])["hits"]
    out["attack_hits"] = [float(x) for v in hits.values() for x in v]
    labels = H.score_hallucination(sets["hallucination"], out["hallucination"]["outputs"])["labels"]["unknown"]
    out["abstained"] = [float(x == "abstain") for x in labels]
    out["prose"] = perplexity(model, prose, tok, seq_len=512, batch_size=8)
    return out


def run(args) -> int:
    import torch

    from tunelab.errors import TunelabError
    from tunelab.eval.heldout import scan_training_data
    from tunelab.eval.heldout_prose import PARAGRAPHS
    from tunelab.eval.tasks import TRAIN_FAMILIES
    from tunelab.train import outdir
    from tunelab.train.run import build_model, pick_device, run_training

    clock = _Clock()
    cfg = quickstart_config(args)  # a bad flag fails here, before anything is written
    for flag, value in (("--eval-per-family", args.eval_per_family), ("--check-n", args.check_n),
                        ("--unseen-per-family", args.unseen_per_family),
                        ("--train-per-family", args.train_per_family)):
        if value < 1:
            raise TunelabError(f"{flag} must be 1 or more, got {value}")
    if args.out is not None:
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise TunelabError(f"--out {args.out} is a file; give a folder for the run")
        replaced = outdir.check_free(Path(args.out), resume=False, overwrite=args.overwrite)

    train_items, sets = task_sets(args)
    prose = list(PARAGRAPHS)

    torch.manual_seed(cfg.train.seed)
    model, tok = build_model(cfg, pick_device(cfg.train.device))  # a bad --model fails here, before any file
    if args.out is None:
        out = outdir.new_run_dir("quickstart")
        outdir.point_latest(out)
    else:
        out = Path(args.out)
        outdir.clear(out, replaced)
    write_data(cfg, out, train_items, sets["test"])
    scan = scan_training_data(cfg.data, {"held-out prose": prose})
    clock.lap("load")
    print(f"\n[1/3] before: {len(sets['test'])} held-out items of trained families, {len(sets['unseen'])} of unseen "
          f"ones, {len(sets['injection'])} attacked documents, {len(sets['hallucination'])} unknown-fact questions, "
          f"held-out prose ({scan.overlap_line('held-out prose')})")
    before = {**_measure(model, tok, sets, prose), "eval_loss": _eval_loss(model, tok, cfg)}
    clock.lap("before")

    print(f"\n[2/3] {args.method} on {len(train_items)} instruction pairs ({', '.join(TRAIN_FAMILIES)})")
    summary, model = run_training(cfg, model=(model, tok))
    clock.lap("train")

    print("\n[3/3] after")
    after = {**_measure(model, tok, sets, prose), "eval_loss": summary["eval_loss"]}
    clock.lap("after")

    report = _report(args, cfg, sets, before, after, summary, scan, out, clock)
    (out / "quickstart.md").write_text(report + "\n")
    (out / "quickstart.json").write_text(json.dumps({"before": _strip(before), "after": _strip(after),
                                                      "unseen_ids": [it.id for it in sets["unseen"]],
                                                      "train": summary, "seconds": clock.table()}, indent=1))
    print("\n" + report)
    return 0


def task_sets(args) -> tuple[list, dict]:
    """(training items, evaluation sets) of a quickstart, seeded: args.train_per_family items of each trained
    family (seed 1); "test" new items of those families (seed 2, training prompts removed), "unseen"
    args.unseen_per_family items of each held-out family of the instruct collection, and the cost checks
    (args.check_n documents' attacks, 2 * check_n unknown people)."""
    from tunelab.eval import injection as J
    from tunelab.eval.suites import hallucination_eval_items
    from tunelab.eval.tasks import TRAIN_FAMILIES, generate_items

    train_items = generate_items(TRAIN_FAMILIES, args.train_per_family, seed=1)
    seen = {it.prompt for it in train_items}
    sets = {"test": [it for it in generate_items(TRAIN_FAMILIES, args.eval_per_family, seed=2) if it.prompt not in seen],
            "unseen": generate_items(unseen_families(), args.unseen_per_family, seed=2),
            # the cost checks: attacked documents only (attack success), unknown people only (abstention)
            "injection": [it for it in J.make_items(args.check_n, seed=2) if it.meta["kind"] == "attacked"],
            "hallucination": hallucination_eval_items(2 * args.check_n, seed=2, kinds=("unknown",))}
    return train_items, sets


def write_data(cfg, out: Path, train_items: list, test: list) -> None:
    """Write the run's data to out/data/{train,eval}.jsonl and point cfg (output_dir, sources, eval_path) there."""
    cfg.output_dir = str(out)
    _write_jsonl(out / "data" / "train.jsonl", train_items)
    _write_jsonl(out / "data" / "eval.jsonl", test)
    cfg.data.sources[0].path = str(out / "data" / "train.jsonl")
    cfg.data.eval_path = str(out / "data" / "eval.jsonl")


def _report(args, cfg, sets, before, after, summary, scan, out, clock) -> str:
    from tunelab.eval.stats import constant_baseline
    from tunelab.eval.tasks import TRAIN_FAMILIES

    rows = []
    for k, what in (("test", "held-out items of the trained families"), ("unseen", "unseen families (transfer)")):
        base = constant_baseline(sets[k])["scores"]
        rows.append(_rate_row(f"{what}: score, partial credit (n={len(sets[k])})",
                              before[k]["scores"], after[k]["scores"], base))
        rows.append(_rate_row("  the same items: exact match", exact(before[k]["scores"]), exact(after[k]["scores"]),
                              exact(base)))
    b, a = before["eval_loss"], after["eval_loss"]
    rows.append(("held-out response loss (nats/token)", f"{b:.3f}", f"{a:.3f}", f"{a - b:+.3f}", ""))
    rows.append(_rate_row(f"cost: prompt-injection attack success (n={len(sets['injection'])} attacks)",
                          before["attack_hits"], after["attack_hits"]))
    rows.append(_rate_row(f"cost: unknown-fact abstention (n={len(sets['hallucination'])} questions)",
                          before["abstained"], after["abstained"]))
    b, a = before["prose"]["ppl"], after["prose"]["ppl"]
    rows.append((f"cost: held-out prose perplexity ({before['prose']['tokens']} tokens)", f"{b:.2f}", f"{a:.2f}",
                 f"{a - b:+.2f}", ""))
    (lo_b, hi_b), (lo_a, hi_a) = (interval(r["test"]["scores"]) for r in (before, after))
    separate = "do not overlap" if lo_a > hi_b or hi_a < lo_b else "OVERLAP: use more --eval-per-family"
    fam_rows = []
    for k, fams in (("test", TRAIN_FAMILIES), ("unseen", unseen_families())):
        const = constant_baseline(sets[k])
        for f in fams:
            pick = [i for i, it in enumerate(sets[k]) if it.family == f]
            cell = lambda r: _pct(mean(r[k]["scores"][i] for i in pick))  # noqa: E731
            fam_rows.append((f, len(pick), cell(before), cell(after),
                             f"{_pct(mean(const['scores'][i] for i in pick))} ({const['answers'][f]!r})"))
    examples = []
    test = sets["test"]
    for i in range(0, len(test), max(1, len(test) // 4))[:4]:
        it = test[i]
        examples.append(f"- prompt: {it.prompt!r}\n  expected: {it.answer!r}\n"
                        f"  before:   {before['test']['outputs'][i]!r}\n  after:    {after['test']['outputs'][i]!r}")
    return "\n\n".join([
        f"# tunelab quickstart: {args.method} on {cfg.model.source}",
        _table(rows, ("metric", "before [95% CI]", "after [95% CI]", "change [95% CI, paired]", "constant-answer baseline")),
        f"Trained families' score: the 95% intervals before and after {separate}. Intervals: Wilson score "
        "intervals for 0/1 outcomes (exact match, attack success, abstention), percentile bootstrap over items "
        f"(2000 resamples) for partial-credit scores; the change's interval is the percentile bootstrap of the "
        f"per-item differences (the same items before and after). {BASELINE_NOTE} Held-out prose: "
        f"{scan.overlap_line('held-out prose')}.",
        _table(fam_rows, ("family", "n", "before", "after", "constant answer")),
        "Generations (greedy):\n" + "\n".join(examples),
        f"Training: {summary['steps']} steps, loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}, "
        f"{summary['seconds']:.0f} s; adapter: {summary['output']}; loss plot: {out / 'loss.png'}.",
        "Time, wall / CPU seconds (CPU: this process, all threads): "
        + ", ".join(f"{k} {w:.0f} / {c:.0f}" for k, (w, c) in clock.table().items()) + ".",
    ])


def quickstart_config(args):
    """The RunConfig of a quickstart run: QUICKSTART with the flags' values (paths are filled in later)."""
    from tunelab.config import validate_config

    train = {**QUICKSTART["train"], "lr": args.lr, "epochs": args.epochs}
    if args.max_steps is not None:
        train["max_steps"] = args.max_steps
    tree = {**QUICKSTART, "method": args.method, "model": {**QUICKSTART["model"], "source": args.model}, "train": train}
    return validate_config(tree, "quickstart")  # validation copies the nested dicts: QUICKSTART stays as it is


def _eval_loss(model, tok, cfg) -> float:
    """The held-out loss before training, on the batches the training loop evaluates after it (same data
    build, seed, batch size and eval_batches). For qlora the model is already 4-bit: the loop's start."""
    from tunelab.data import build_datasets
    from tunelab.train.loop import evaluate_loss

    _, eval_set = build_datasets(cfg.data, tok, cfg.train.seq_len, cfg.train.seed)
    return evaluate_loss(model, eval_set, cfg.train.batch_size, tok.pad_token_id, next(model.parameters()).device,
                         cfg.train.loss_chunk_tokens, cfg.train.eval_batches)


def _strip(r: dict) -> dict:
    """What quickstart.json keeps of one model's measurements (per-item scores and outputs, no models)."""
    keep = ("accuracy", "per_family", "scores", "outputs", "seconds")
    tasks = {k: {**{m: r[k][m] for m in keep}, "exact_match": mean(exact(r[k]["scores"]))} for k in ("test", "unseen")}
    checks = {k: {m: r[k][m] for m in ("outputs", "seconds")} for k in ("injection", "hallucination")}
    return {**tasks, **checks, **{k: r[k] for k in ("attack_hits", "abstained", "prose", "eval_loss")}}


# The quickstart's run config (paths are filled in at run time); `tunelab train` accepts the same keys.
QUICKSTART = {
    "method": "qlora",
    "model": {"source": "bundled"},
    "quant": {"quant_type": "nf4", "block_size": 64, "double_quant": True},
    "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
    "data": {"task": "sft", "sources": [{"name": "tasks", "path": "train.jsonl", "kind": "instructions"}],
             "packing": "padded", "eval_path": "eval.jsonl"},
    "train": {"batch_size": 8, "epochs": 1, "lr": 1e-3, "warmup_steps": 4, "seq_len": 256, "log_every": 1},
}

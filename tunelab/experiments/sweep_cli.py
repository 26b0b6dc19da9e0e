"""`tunelab sweep CONFIG --grid key=values ... --out DIR`: a resumable grid of runs; `--report DIR` redraws it.

    tunelab sweep configs/lora-sft.yaml --grid method=full,lora,qlora lr=1e-5:1e-2:log8 batch_size=4,16,64
    tunelab sweep --report runs/sweep          # table + plots again, from the recorded cells only

Run the same command again to resume: finished cells (those with result.json) are skipped.
"""

from __future__ import annotations

from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("config", nargs="?", help="the base YAML run config every cell starts from")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the base config, for every cell")
    p.add_argument("--grid", nargs="+", default=[], metavar="KEY=VALUES",
                   help="axes: method=full,lora  lr=1e-5:1e-2:log8  batch_size=4,16,64  rank=8,64  "
                        "data=a.jsonl,b.jsonl  or any dotted key (train.weight_decay=0,0.1)")
    p.add_argument("--out", default="runs/sweep", help="sweep folder (default runs/sweep)")
    p.add_argument("--examples", type=int, help="training sequences per cell (default: base max_steps x batch)")
    p.add_argument("--tokens", type=int, help="training tokens per cell, for packed data (= sequences x seq_len)")
    p.add_argument("--epochs", type=float, help="equal epochs instead: each cell makes this many passes over its data")
    p.add_argument("--eval-examples", type=int, help="held-out examples every cell is scored on "
                                                     "(default: base eval_batches x batch_size)")
    p.add_argument("--eval-tasks", type=int, default=0, metavar="N",
                   help="also score N held-out task items per family (accuracy, format compliance) per cell")
    p.add_argument("--jobs", type=int, default=1, help="cells run at once, each in its own process")
    p.add_argument("--keep-outputs", action="store_true", help="keep each cell's trained model/adapter")
    p.add_argument("--plan", action="store_true", help="write and list the cells without training")
    p.add_argument("--report", metavar="DIR", help="only regenerate DIR's table and plots from its recorded runs")


def run(args) -> int:
    from tunelab.errors import ConfigError
    from tunelab.experiments.report import write_report

    if args.report:
        rep = write_report(Path(args.report))
        print(f"{args.report}/report.md: {len(rep['results'])} results; plots: {', '.join(rep['plots']) or 'none'}")
        _print_findings(rep["findings"])
        return 0
    if not args.config or not args.grid:
        raise ConfigError("give a base config and --grid axes (or --report DIR)")
    from tunelab.experiments import grid, sweep

    axes = grid.parse_grid(args.grid)
    extras = {"eval_tasks": {"n": args.eval_tasks}} if args.eval_tasks else {}
    out = Path(args.out)
    dirs = sweep.plan(out, args.config, axes, args.overrides, args.examples, args.tokens, args.eval_examples,
                      extras, args.epochs)
    if args.plan:
        for d in dirs:
            print(d.name, "(finished)" if sweep.is_finished(d) else "")
        return 0
    failed = sweep.run_cells(dirs, args.jobs, args.keep_outputs)
    rep = write_report(out)
    print(f"{out}/report.md: {len(rep['results'])} of {len(dirs)} cells recorded")
    _print_findings(rep["findings"])
    if failed:
        print(f"{len(failed)} cells failed (see their error.txt / log.txt); rerun the same command to retry them")
        return 1
    return 0


def _print_findings(rows: list[dict]) -> None:
    for r in rows:
        if "lr_ratio" in r:
            print(f"{r['group']}: {r['curve']}/full optimal lr {r['ratio_text']}, loss gap {r['loss_gap']:+.4f}")

"""Instruction-tuning experiments on the `instruct` collection (docs/instruction-tuning.md).

`--design families` (default): unseen-family transfer against the number of trained families, at a fixed
budget. One `tunelab sweep` over data=families-K.jsonl (K trained families, the same number of examples each),
every cell and the base model scored on the same items of the 11 held-out families.
`--design phrasings`: prompt-distribution sensitivity. Two cells on the same pairs of the 44 trained families,
every pair in its family's first training phrasing (`one`) or in one of its 5 (`all`); every cell and the base
model scored on the same items of 11 trained families (one per group) under each of the 7 phrasings.
`--design methods`: full fine-tuning, LoRA and QLoRA on the same pairs of the 44 trained families, each at its
own learning rate (`--lrs`); every model scored on the same new items of all 55 families.
LoRA on the bundled model (tunelab.experiments.instruct). Resumable: run the same command again.

    python benchmarks/instruct_families.py --out runs/instruct-families            # K = 5,10,20,44
    python benchmarks/instruct_families.py --design phrasings --eval-n 5 --out runs/instruct-phrasings
    python benchmarks/instruct_families.py --design methods --eval-n 5 --out runs/instruct-methods
    python benchmarks/instruct_families.py --model tiny-model --ks 1,2 --examples 8 --eval-n 1 --out runs/demo
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def base_overrides(a, eval_path: str) -> list[str]:
    """The overrides of configs/sweep-sft.yaml every cell shares (the grid adds the cell's data file)."""
    # generated, checked pairs: no quality filter may drop one family's items (it would skew the balance)
    return [f"model.source={a.model}", f"method={a.method}", f"train.lr={a.lr}", f"train.batch_size={a.batch_size}",
            f"train.seed={a.seed}", f"data.seed={a.seed}", f"data.eval_path={eval_path}", "data.filters.enabled=false"]


def main(argv: list[str] | None = None) -> int:
    from tunelab.experiments.instruct import METHOD_LRS

    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/instruct-families")
    p.add_argument("--design", choices=("families", "phrasings", "methods"), default="families")
    p.add_argument("--ks", default="5,10,20,44", help="numbers of trained families, one cell each (families design)")
    p.add_argument("--examples", type=int, default=384, help="training examples of every cell (one epoch)")
    p.add_argument("--eval-n", type=int, default=20, help="generation items per scored family (11 families; "
                   "under each of the 7 phrasings in the phrasings design)")
    p.add_argument("--eval-examples", type=int, default=64, help="pairs of the eval loss: held-out families "
                   "(families design) or the scored families in held-out phrasings (phrasings design)")
    p.add_argument("--model", default="bundled")
    p.add_argument("--lrs", default=",".join(f"{m}={v}" for m, v in METHOD_LRS.items()),
                   help="methods design: the methods and each one's learning rate")
    p.add_argument("--method", default="lora")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (the quickstart's LoRA rate)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="train.seed and data.seed; the pairs are drawn with "
                   "instruct.pair_seed(seed) (the scored items do not change with it, so runs of different seeds "
                   "are paired too)")
    p.add_argument("--pair-seed", type=int, help="the seed the training pairs are drawn with, when not the default")
    p.add_argument("--jobs", type=int, default=1)
    a = p.parse_args(argv)
    from tunelab.experiments import grid, instruct, sweep

    a.pair_seed = instruct.pair_seed(a.seed) if a.pair_seed is None else a.pair_seed

    out = Path(a.out)
    scoring = {"n": a.eval_n, "collection": "instruct", "seed": instruct.EVAL_SEED}
    if a.design == "families":
        info = instruct.build_data(out / "data", [int(k) for k in a.ks.split(",")], a.examples, a.eval_examples,
                                   seed=a.pair_seed)
        summarize, table = instruct.summarize, instruct.table
    elif a.design == "methods":
        return run_methods(a, out, scoring)
    else:
        info = instruct.build_phrasing_data(out / "data", a.examples, a.eval_examples, seed=a.pair_seed)
        scoring.update(families=instruct.phrasing_families(), phrasings="every")
        summarize, table = instruct.summarize_phrasings, instruct.phrasing_table
    axes = grid.parse_grid(["data=" + ",".join(v["path"] for v in info["files"].values())])
    dirs = sweep.plan(out / "sweep", ROOT / "configs/sweep-sft.yaml", axes, base_overrides(a, info["eval_path"]),
                      examples=a.examples, eval_examples=a.eval_examples, extras={"eval_tasks": scoring})
    if not (out / "base.json").exists():
        b = instruct.evaluate_base(out)
        print(f"base: score {b['accuracy']:.3f}, eval loss {b['eval_loss']:.3f}", flush=True)
    failed = sweep.run_cells(dirs, a.jobs)
    print(table(summarize(out)), end="")
    return 1 if failed else 0


def run_methods(a, out: Path, scoring: dict) -> int:
    """One single-cell sweep per method (DIR/sweep-<method>: each its own learning rate), all run together."""
    from tunelab.errors import TunelabError
    from tunelab.experiments import grid, instruct, sweep

    try:
        lrs = {m: float(v) for m, v in (item.split("=") for item in a.lrs.split(","))}
    except ValueError:
        raise TunelabError(f"--lrs takes method=lr pairs, e.g. full=1.7e-4,lora=2.2e-3; got {a.lrs!r}") from None
    info = instruct.build_method_data(out / "data", a.examples, a.eval_examples, seed=a.pair_seed)
    scoring.update(families=instruct.method_families())
    sweeps, dirs = {m: f"sweep-{m}" for m in lrs}, []
    for m, lr in lrs.items():
        overrides = base_overrides(argparse.Namespace(**{**vars(a), "method": m, "lr": lr}), info["eval_path"])
        dirs += sweep.plan(out / sweeps[m], ROOT / "configs/sweep-sft.yaml",
                           grid.parse_grid([f"method={m}", "data=" + info["files"]["methods"]["path"]]), overrides,
                           examples=a.examples, eval_examples=a.eval_examples, extras={"eval_tasks": scoring})
    if not (out / "base.json").exists():
        b = instruct.evaluate_base(out, sweeps[next(iter(lrs))])
        print(f"base: score {b['accuracy']:.3f}, eval loss {b['eval_loss']:.3f}", flush=True)
    base = json.loads((out / "base.json").read_text())
    if "qlora" in lrs and "nf4_eval_loss" not in base:  # what quantizing costs before any training
        base["nf4_eval_loss"] = instruct.base_loss(out, sweeps["qlora"])
        (out / "base.json").write_text(json.dumps(base, indent=1))
    failed = sweep.run_cells(dirs, a.jobs)
    print(instruct.method_table(instruct.summarize_methods(out, sweeps)), end="")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""LoRA against full fine-tuning at large effective batches (docs/instruction-tuning.md; issue 30).

Full fine-tuning and LoRA at ranks 1, 16, 128 (alpha 32) on pairs of the 44 trained families of the `instruct`
collection, effective batches 64, 128, 256 by gradient accumulation (micro-batch 8), every cell the same number
of examples. Stage 1 (seed 0) picks each arm's learning rate on a small grid; stage 2 runs seeds 1 and 2 at it.
One command runs both stages and is resumable: run it again to continue (tunelab.experiments.lora_batch).

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/lora_batch.py --jobs 2 --out runs/lora-batch   # the design
    python benchmarks/lora_batch.py --quick --out runs/lora-batch-quick       # pipeline check: 2 batches, 1 rank
    python benchmarks/lora_batch.py --model tiny-model --quick --out runs/demo

Writes DIR/summary.json, DIR/table.md and DIR/gap.png (gap LoRA - full against batch, one line per rank).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _ints(text: str, flag: str) -> list[int]:
    from tunelab.errors import TunelabError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise TunelabError(f"{flag} takes positive integers separated by commas, e.g. 64,256; got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    from tunelab.experiments import lora_batch as lb

    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/lora-batch")
    p.add_argument("--model", default="bundled")
    # the defaults are the budget design (docs/instruction-tuning.md: about 2 CPU-hours); lb.BATCHES, lb.RANKS
    # and more examples are the whole design, which --measure prices
    p.add_argument("--batches", default="64,256", help=f"effective batch sizes (whole design: {lb.BATCHES})")
    p.add_argument("--ranks", default=str(lb.PRIMARY_RANK), help=f"LoRA ranks, alpha 32 (whole design: {lb.RANKS})")
    p.add_argument("--examples", type=int, default=512, help="training examples of every cell (one epoch)")
    p.add_argument("--eval-examples", type=int, default=128, help="eval pairs (same families, other items)")
    p.add_argument("--micro", type=int, default=lb.MICRO, help="micro-batch; grad_accum = batch / micro")
    p.add_argument("--lr-points", type=int, default=3, help="stage-1 rates per arm")
    p.add_argument("--extend", type=int, default=1, help="rounds of one more rate beyond an edge optimum")
    p.add_argument("--seeds", type=int, default=len(lb.SEEDS), help="seeds 0..N-1 (0 picks the rates)")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--measure", action="store_true", help="instead of the run: time one short cell of each kind "
                   "(full, LoRA r128; 1 and 2 steps of 64 = 8 x 8 examples) into DIR/measure/measure.json, or "
                   "reuse it, and print the CPU-hour estimate of the design the other options describe")
    p.add_argument("--quick", action="store_true", help="pipeline check: batches 8,16, rank 16, 32 examples, "
                   "2 rates, 2 seeds, 8 eval pairs, micro-batch 4, no extension")
    a = p.parse_args(argv)
    if a.quick:
        a.batches, a.ranks, a.examples, a.eval_examples, a.lr_points, a.seeds, a.micro, a.extend = \
            "8,16", "16", 32, 8, 2, 2, 4, 0
    from tunelab.errors import TunelabError

    batches, ranks = _ints(a.batches, "--batches"), _ints(a.ranks, "--ranks")
    if a.examples < max(batches) or a.examples % max(batches):
        raise TunelabError(f"--examples {a.examples} must be a multiple of the largest batch {max(batches)} "
                           "(every batch size then sees exactly the same examples)")
    out = Path(a.out)
    seeds = tuple(range(a.seeds))
    if a.measure:
        return measure(a, out / "measure", batches, ranks)
    data = lb.build_data(out / "data", a.examples, a.eval_examples, seeds)
    failed = lb.run(out, ROOT / "configs/sweep-sft.yaml", a.model, data, lb.arms(batches, ranks), a.lr_points,
                    a.extend, seeds, a.jobs, a.micro)
    lb.base_eval(out)
    lb.summarize(out)
    print((out / "table.md").read_text(), end="")
    return 1 if failed else 0


def measure(a, out: Path, batches: list[int], ranks: list[int]) -> int:
    """Measure (or reuse) the per-example and per-cell CPU costs, print them and the design's estimate."""
    import json

    from tunelab.experiments import lora_batch as lb

    data = lb.build_data(out / "data", 2 * 64, a.eval_examples, seeds=(0,))
    cost = lb.measure(out, ROOT / "configs/sweep-sft.yaml", a.model, data, 64, (128,), a.micro)
    est = lb.estimate(cost, batches, ranks, a.examples, a.lr_points, a.extend, a.seeds)
    print(json.dumps({"measured": cost, "design": {"batches": batches, "ranks": ranks, "examples": a.examples,
                                                   "eval_examples": a.eval_examples, "lr_points": a.lr_points,
                                                   "extend": a.extend, "seeds": a.seeds}, "estimate": est}, indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # a TunelabError is the user's to fix: one line, exit 2
        from tunelab.errors import TunelabError

        if not isinstance(e, TunelabError):
            raise
        print(f"lora_batch: error: {e}", file=sys.stderr)
        sys.exit(2)

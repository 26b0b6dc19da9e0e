"""Reproduce two LoRA findings on the bundled model with `tunelab sweep` (docs/experiments.md).

1. The best LoRA learning rate is ~10x the best full fine-tuning one (Schulman et al., "LoRA Without Regret").
2. LoRA loses more than full fine-tuning at large batch sizes, and a higher rank does not fix it.

    python benchmarks/lora_regret.py                 # ~1 h on 2 idle cores (resumable: rerun to continue)
    python benchmarks/lora_regret.py --quick         # 2 lrs x 1 batch size, to check the pipeline (minutes)
    python benchmarks/lora_regret.py --methods full,lora   # 28 cells instead of 42

Writes runs/lora-regret/{report.md, lr_curves.png, findings.json, results.jsonl}. Equal budget: every cell
sees the same number of training examples (max_steps = examples / batch_size).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/lora-regret")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--methods", default="full,lora,qlora", help="e.g. full,lora to halve the run")
    a = p.parse_args()
    from tunelab.experiments import grid, quality, sweep
    from tunelab.experiments.report import write_report

    out = Path(a.out)
    data = quality.build_variants(out / "data", n=512, multiples=())["clean-512"]["path"]
    axes = grid.parse_grid(["method=full,lora", "lr=3e-5:3e-3:log3", "batch_size=8"] if a.quick else
                           [f"method={a.methods}", "lr=1e-5:1e-2:log7", "batch_size=4,16", "rank=16"])
    dirs = sweep.plan(out, ROOT / "configs/sweep-sft.yaml", axes,
                      [f"data.sources=[{{name: tasks, path: {data}, kind: qa}}]"])
    failed = sweep.run_cells(dirs, a.jobs)
    rep = write_report(out)
    for r in rep["findings"]:
        if "lr_ratio" in r:
            print(f"{r['group']}: {r['curve']}/full optimal lr {r['ratio_text']}; loss gap {r['loss_gap']:+.4f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Quality against quantity for SFT with `tunelab sweep` over data variants (docs/experiments.md).

N clean task pairs against 4N and 10N pairs of which half are corrupted (wrong answer, truncated, or wrapped
in chatter: tunelab.experiments.quality.corrupt), LoRA on the bundled model, compared
(a) at equal training examples (~ equal tokens) and (b) at equal epochs; each cell is scored on held-out
task families (accuracy with the families' checkers, and format compliance).

    python benchmarks/quality_vs_quantity.py            # bundled model, N=200 (resumable)
    python benchmarks/quality_vs_quantity.py --n 50 --eval-n 5 --model PATH   # a smaller check
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--n", type=int, default=200, help="clean pairs (the noisy variants have 4N and 10N)")
    p.add_argument("--share", type=float, default=0.5, help="share of corrupted responses in the noisy variants")
    p.add_argument("--eval-n", type=int, default=20, help="held-out items per family")
    p.add_argument("--model", default="bundled")
    p.add_argument("--epochs", type=float, default=2.0, help="epochs of the equal-epochs comparison")
    p.add_argument("--lr", type=float, default=1e-3, help="LoRA learning rate (the quickstart's)")
    p.add_argument("--jobs", type=int, default=1)
    a = p.parse_args()
    from tunelab.experiments import grid, quality, sweep
    from tunelab.experiments.report import write_report

    out = Path(a.out)
    variants = quality.build_variants(out / "data", a.n, (4, 10), a.share)
    paths = ",".join(v["path"] for v in variants.values())
    axes = grid.parse_grid([f"data={paths}"])
    base = [f"model.source={a.model}", "data.eval_fraction=0.05", f"train.lr={a.lr}"]
    failed = []
    for name, budget in (("equal-examples", {"examples": 4 * a.n}), ("equal-epochs", {"epochs": a.epochs})):
        d = out / name
        dirs = sweep.plan(d, ROOT / "configs/sweep-sft.yaml", axes, base, extras={"eval_tasks": {"n": a.eval_n}},
                          **budget)
        failed += sweep.run_cells(dirs, a.jobs)
        rep = write_report(d)
        for r in rep["results"]:
            print(f"{name} {r['cell']}: accuracy {r.get('accuracy')}, format {r.get('format_ok')}, "
                  f"steps {r['steps']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Quality against quantity on the `instruct` collection (docs/instruction-tuning.md).

N pairs over the 44 trained families, clean and with a share of corrupted responses, for each N in --ns (nested
sets), trained at equal steps (--steps each) and for one epoch each; every cell and the base model scored on the
same items of the trained families (primary) and the held-out families. LoRA on the bundled model
(tunelab.experiments.instruct_quality). Resumable: run the same command again.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/instruct_quality.py --eval-n 5 --jobs 2 --out runs/instruct-quality
    python benchmarks/instruct_quality.py --model tiny-model --ns 8,16 --steps 4 --batch-size 4 --eval-n 1 --out runs/demo
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.instruct_families import base_overrides  # noqa: E402  (the cells' shared overrides)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/instruct-quality")
    p.add_argument("--ns", default="100,300,1000", help="numbers of training pairs (nested sets, all 44 trained families)")
    p.add_argument("--share", type=float, default=0.3, help="share of corrupted responses in the noisy sets")
    p.add_argument("--steps", type=int, default=125, help="steps of every equal-steps cell (default: one epoch of "
                   "1000 pairs at batch 8)")
    p.add_argument("--eval-n", type=int, default=5, help="scored items per family (44 trained + 11 held-out families)")
    p.add_argument("--eval-examples", type=int, default=64, help="clean trained-family pairs of the eval loss")
    p.add_argument("--model", default="bundled")
    p.add_argument("--method", default="lora")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (the quickstart's LoRA rate)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="train.seed and data.seed; the pairs are drawn and corrupted "
                   "with seed+1 (the scored items do not change with it)")
    p.add_argument("--jobs", type=int, default=1)
    a = p.parse_args(argv)
    from tunelab.errors import TunelabError
    from tunelab.experiments import instruct, sweep
    from tunelab.experiments import instruct_quality as iq

    out = Path(a.out)
    try:
        ns = [int(n) for n in a.ns.split(",")]
        if not 0 <= a.share <= 1:
            raise TunelabError(f"--share must be in [0, 1], got {a.share}")
        info = iq.build_data(out / "data", ns, a.share, a.eval_examples, a.eval_n, seed=a.seed + 1)
        dirs = iq.plan_cells(out, ROOT / "configs/sweep-sft.yaml", base_overrides(a, info["eval_path"]), info,
                             a.steps, a.batch_size, a.eval_examples, a.eval_n)
    except (ValueError, TunelabError) as e:
        print(f"instruct_quality: error: {e}", file=sys.stderr)
        return 2
    if not (out / "base.json").exists():
        b = instruct.evaluate_base(out)  # scores as the first cell of DIR/sweep does
        print(f"base: score {b['accuracy']:.3f}, eval loss {b['eval_loss']:.3f}", flush=True)
    failed = sweep.run_cells(dirs, a.jobs)
    print(iq.table(iq.summarize(out)), end="")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""What FSDP saves per process (docs/training.md, "FSDP"): the tiny random Llama of the tests, each method,
1 process vs 2 processes under torchrun with train.distributed=fsdp (gloo, CPU).

    nice -n 19 python benchmarks/fsdp_memory.py

Prints, from each run's summary.json, the bytes one process stores for float parameters and AdamW state
(`process_bytes`, FSDP: its shards), the packed 4-bit weights (qlora; not sharded) and the three losses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout: tunelab and tests.support

from tests.support.tiny_run import losses, make_workspace, run_config  # noqa: E402
from tunelab.cli import main  # noqa: E402

METHODS = ["full", "lora", "qlora"]


def packed_bytes(ws: Path) -> int:
    """Bytes of the packed 4-bit weights (codes + scales) of the tiny model as qlora quantizes it (block 32)."""
    from tunelab.config import QuantConfig
    from tunelab.models.load import load_pretrained
    from tunelab.quant import Linear4bit

    model, _ = load_pretrained(str(ws / "model"), quant=QuantConfig(block_size=32))
    return sum(m.nbytes for m in model.modules() if isinstance(m, Linear4bit))


def main_() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        ws = make_workspace(d, records=96)
        cfg = lambda m, tag, **t: run_config(ws, d / f"{m}-{tag}", method=m, quant={"block_size": 32},  # noqa: E731
                                             data={"eval_fraction": 0.1}, train={"max_steps": 3, **t})
        for m in METHODS:
            assert main(["train", str(cfg(m, "one", batch_size=4)), "--no-progress"]) == 0
        jobs = [str(cfg(m, "fsdp", batch_size=2, distributed="fsdp")) for m in METHODS]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29641",
                        str(ROOT / "tests" / "support" / "torchrun_train.py"), *jobs], env=env, check=True, capture_output=True)
        print(f"packed 4-bit weights (qlora, every process keeps all): {packed_bytes(ws):,} B")
        print("| method | processes | float parameters / process | AdamW state / process | losses |")
        print("|---|---|---|---|---|")
        for m in METHODS:
            for tag, n in (("one", 1), ("fsdp", 2)):
                b = json.loads((d / f"{m}-{tag}" / "summary.json").read_text())["process_bytes"]
                print(f"| {m} | {n} | {b['parameters']:,} B | {b['optimizer']:,} B | "
                      f"{', '.join(f'{x:.6f}' for x in losses(d / f'{m}-{tag}'))} |")


if __name__ == "__main__":
    main_()

"""What FSDP saves per process (docs/training.md, "FSDP"; docs/scaling.md): 1 process vs 2 processes under
torchrun with train.distributed=fsdp (gloo, CPU).

    nice -n 19 python benchmarks/fsdp_memory.py            # the tests' tiny random Llama: full, lora, qlora
    nice -n 19 python benchmarks/fsdp_memory.py --bundled  # qlora on the bundled SmolLM2-135M (NF4, block 64)

Prints, from each run's summary.json, the bytes each process stores (`process_bytes_by_rank`, measured by each
process on its own tensors; FSDP: its shards) for float parameters, the packed 4-bit weights (qlora: codes and
scales) and AdamW state, and the losses. The one-process twin of 2 processes x batch 2 is batch 2 x grad_accum 2.
"""

from __future__ import annotations

import argparse
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


def _torchrun(configs: list[Path]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29641",
                    str(ROOT / "tests" / "support" / "torchrun_train.py"), *map(str, configs)], env=env, check=True,
                   capture_output=True)


def _row(name: str, n: int, out: Path) -> str:
    ranks = json.loads((out / "summary.json").read_text())["process_bytes_by_rank"]
    cell = lambda k: " / ".join(f"{b[k]:,}" for b in ranks) + " B"  # noqa: E731
    return (f"| {name} | {n} | {cell('parameters')} | {cell('quantized')} | {cell('optimizer')} | "
            f"{', '.join(f'{x:.6f}' for x in losses(out))} |")


def measure(ws: Path, d: Path, methods: list[str], **extra) -> None:
    """Each method one process (batch 2 x grad_accum 2), then all of them in one torchrun of 2 processes."""
    def cfg(m, tag, **t):
        return run_config(ws, d / f"{m}-{tag}", method=m, **{**extra, "train": {**extra.get("train", {}), **t}})

    for m in methods:
        assert main(["train", str(cfg(m, "one", batch_size=2, grad_accum=2)), "--no-progress"]) == 0
    _torchrun([cfg(m, "fsdp", batch_size=2, distributed="fsdp") for m in methods])
    print("| method | processes | float parameters / process | 4-bit weights / process | AdamW state / process "
          "| losses |")
    print("|---|---|---|---|---|---|")
    for m in methods:
        print(_row(m, 1, d / f"{m}-one"))
        print(_row(m, 2, d / f"{m}-fsdp"))


def main_() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundled", action="store_true", help="qlora on the bundled SmolLM2-135M instead")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        ws = make_workspace(d, records=96)
        if args.bundled:
            measure(ws, d, ["qlora"], model={"source": "bundled"}, lora={"r": 8, "alpha": 16},
                    train={"max_steps": 2, "seq_len": 64})
        else:
            measure(ws, d, ["full", "lora", "qlora"], quant={"block_size": 32}, data={"eval_fraction": 0.1},
                    train={"max_steps": 3})


if __name__ == "__main__":
    main_()

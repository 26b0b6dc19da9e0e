"""Peak memory of `tunelab merge` of a QLoRA run of the bundled model (numbers for docs/export.md).

    python benchmarks/merge_memory.py [--work DIR] [--dtype fp32|bf16]

Makes a QLoRA run (nf4, block 64, double quant; LoRA r=16 on all linears, random B) of the bundled
SmolLM2-135M-Instruct, then merges it in a fresh process and prints that process's peak resident memory
(VmHWM; not ru_maxrss, which a child inherits from its parent) and, at the end of the merge, its anonymous
and file-backed resident memory (/proc/self/status: the base's safetensors file is memory-mapped, so its
pages count as file-backed, evictable page cache).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def make_run(run: Path) -> None:
    import torch

    from tunelab.lora import LoraConfig, apply_lora, save_adapter
    from tunelab.models.load import load_pretrained
    from tunelab.quant import quantize_model

    quant = dict(quant_type="nf4", block_size=64, double_quant=True)
    lora = dict(r=16, alpha=32, target_modules="all-linear")
    model, _ = load_pretrained("bundled")
    quantize_model(model, **quant)
    apply_lora(model, LoraConfig(**lora), verbose=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    save_adapter(model, run / "adapter")
    (run / "config.yaml").write_text(yaml.safe_dump({"method": "qlora", "model": {"source": "bundled"},
                                                     "quant": quant, "lora": lora,  # data: unused by a merge
                                                     "data": {"sources": [{"name": "unused", "path": "unused"}]}}))


def status_mib(key: str) -> float:
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status[key].split()[0]) / 1024  # kB -> MiB


def merge(run: Path, out: Path, dtype: str) -> None:
    """In this (fresh) process: merge, then print the memory figures as JSON."""
    from tunelab.export.merge import merge_to_folder
    from tunelab.models.load import load_pretrained

    shutil.rmtree(out, ignore_errors=True)
    merge_to_folder(str(run), out, dtype=dtype)
    figures = {"peak_rss_mib": status_mib("VmHWM"), "end_anon_mib": status_mib("RssAnon"),
               "end_file_mib": status_mib("RssFile")}
    model, _ = load_pretrained(str(out))
    print(json.dumps({**figures,
                      "model_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/merge_memory")
    ap.add_argument("--dtype", default="base")
    ap.add_argument("--merge-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    run = work / "qlora"
    if args.merge_only:
        return merge(run, work / "merged", args.dtype)
    if not (run / "adapter").is_dir():
        run.mkdir(parents=True, exist_ok=True)
        make_run(run)
    # Python + torch + transformers alone, for the fixed part of the peak.
    imports = subprocess.run([sys.executable, "-c", "import torch, transformers, tunelab.export.merge, benchmarks."
                              "merge_memory as m; print(m.status_mib('VmHWM'))"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
    result = subprocess.run([sys.executable, __file__, "--work", str(work), "--dtype", args.dtype, "--merge-only"],
                            capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    print(f"imports only: peak {float(imports):.0f} MiB")
    print(result)


if __name__ == "__main__":
    main()

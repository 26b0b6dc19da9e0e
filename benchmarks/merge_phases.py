"""Resident memory per phase of `merge_to_folder` (numbers behind docs/export.md, "Merge memory").

    python benchmarks/merge_memory.py --work /tmp/mm          # makes the QLoRA run once
    python benchmarks/merge_phases.py /tmp/mm/qlora /tmp/mm/merged [DTYPE]

A thread samples /proc/self/status (VmRSS, RssAnon, RssFile) every 2 ms; the phase is the tunelab function
running (open_model; "measure": the per-layer merged copies of merged_layer_by_layer; merge_in_place;
save_hf_folder), each wrapped in this process only. Prints the peak of each figure per phase, in MiB.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import tunelab.export.merge as merge  # noqa: E402

FIGURES = ("VmRSS", "RssAnon", "RssFile")


def status_mib() -> dict[str, float]:
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) / 1024 for k in FIGURES}


def main() -> None:
    phase, peaks = ["start"], {}

    def sample():
        while True:
            figures = status_mib()
            peak = peaks.setdefault(phase[0], dict.fromkeys(FIGURES, 0.0))
            for k, v in figures.items():
                peak[k] = max(peak[k], v)
            time.sleep(0.002)

    def label(name, fn):
        def wrapped(*args, **kwargs):
            phase[0] = name
            try:
                return fn(*args, **kwargs)
            finally:
                phase[0] = f"after {name}"
        return wrapped

    merge.open_model = label("open", merge.open_model)
    merge._copy_linears = label("measure", merge._copy_linears)
    merge.merge_in_place = label("merge", merge.merge_in_place)
    merge.save_hf_folder = label("save", merge.save_hf_folder)
    threading.Thread(target=sample, daemon=True).start()
    shutil.rmtree(sys.argv[2], ignore_errors=True)
    merge.merge_to_folder(sys.argv[1], sys.argv[2], dtype=sys.argv[3] if len(sys.argv) > 3 else "base")
    time.sleep(0.05)
    for name, peak in peaks.items():
        print(f"{name:14s} " + " ".join(f"{k}={v:.0f}" for k, v in peak.items()))


if __name__ == "__main__":
    main()

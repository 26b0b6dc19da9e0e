"""Live-tensor peak of one tunelab DPO step with each pair as two sequences and with the shared prompt.

    python benchmarks/preference_memory.py                          # 2 pairs, prompts of 100, responses of 20
    python benchmarks/preference_memory.py --pairs 4 --prompt 200 --response 30   # preference_bench's shape
    python benchmarks/preference_memory.py --tiny                   # a tiny random Llama (a check in seconds)

The step is benchmarks/preference_bench.py's tunelab-lora step (LoRA r=16 all-linear, fp32 CPU, reference =
adapter off) on its pairs, built in this process once per layout; the number is the peak of the tensors
alive during the step above those alive before it (tunelab.experiments.memory.live_peak_bytes: torch's
memory profiler, independent of the allocator). Memory only: no timing (the machine may be shared).
Both layouts' first-step losses (ln 2) and chosen log-probs are printed: they must agree.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> dict:
    import torch
    from preference_bench import _tunelab, examples, tiny_model
    from transformers import AutoTokenizer

    from tunelab.experiments.memory import live_peak_bytes

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=100)
    ap.add_argument("--response", type=int, default=20)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            folder = str(tiny_model(Path(tmp) / "tiny"))
        else:
            from tunelab.models.bundled import model_dir

            folder = str(model_dir())
        pairs = examples(AutoTokenizer.from_pretrained(folder), args.pairs, args.prompt, args.response)
        out = {}
        for name, share in (("two sequences per pair", False), ("shared prompt", True)):
            torch.manual_seed(0)
            step = _tunelab("tunelab-lora", folder, pairs, share_prompt=share)
            first = step()  # the step that creates the optimizer state is not the one measured
            peak = live_peak_bytes(step) / 2**20
            out[name] = {"live_peak_mib": peak, "first_loss": first[0], "first_logps_chosen": first[1]}
            print(f"{name}: live-tensor peak {peak:.0f} MiB; first step loss {first[0]:.6f}, "
                  f"logps/chosen {first[1]:.4f}", flush=True)
    a, b = out.values()
    print(f"shared / two sequences: {b['live_peak_mib'] / a['live_peak_mib']:.2f}x ({args.pairs} pairs, prompts of "
          f"{args.prompt} tokens, responses of {args.response} + EOS)")
    return out


if __name__ == "__main__":
    main()

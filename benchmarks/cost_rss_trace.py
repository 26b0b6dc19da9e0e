"""Resident memory at the points of one training step on the bundled model (docs/experiments.md, cost).

    python benchmarks/cost_rss_trace.py lora 4 256                                # glibc default malloc
    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/cost_rss_trace.py lora 4 256   # fixed mmap threshold
    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/cost_rss_trace.py qlora 1 16 --copy
        # --copy: after prepare, copy the parameters still backed by the memory-mapped checkpoint, so the
        # mapping (and the fp32 pages quantization read through it) is released

Prints VmRSS (after gc + malloc_trim, i.e. what is live) after imports, load, prepare, forward, backward and
the optimizer step, and VmHWM (the peak) after the forward and the backward, in MiB.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers.models.llama.modeling_llama  # noqa: E402,F401
from transformers import AutoModelForCausalLM  # noqa: E402

import tunelab.lora  # noqa: E402,F401
import tunelab.quant  # noqa: E402,F401
from tunelab.config import load_config  # noqa: E402
from tunelab.experiments.cost import _rss_kb  # noqa: E402
from tunelab.heap import release_freed_memory  # noqa: E402
from tunelab.models.load import model_folder  # noqa: E402
from tunelab.train.loss import causal_lm_loss_sum  # noqa: E402
from tunelab.train.run import prepare_method  # noqa: E402


def live(tag: str) -> None:
    gc.collect()
    release_freed_memory()
    print(f"{tag}: live {_rss_kb('VmRSS') // 1024} MiB", flush=True)


def main(method: str, B: int, T: int, copy: bool = False) -> None:
    live("imports")
    cfg = load_config(None, [f"method={method}"], base={"data": {"sources": [{"name": "r", "path": "unused"}]}})
    model = AutoModelForCausalLM.from_pretrained(model_folder("bundled"), dtype=torch.float32)
    live("loaded")
    groups = prepare_method(model, cfg)
    live("prepared")
    if copy:
        for p in model.parameters():
            p.data = p.data.clone()
        live("parameters copied")
    opt = torch.optim.AdamW(groups, lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(T).repeat(B, 1)}
    loss, n = causal_lm_loss_sum(model, batch)
    print(f"peak during forward: {_rss_kb('VmHWM') // 1024} MiB")
    live("after forward")
    (loss / n).backward()
    print(f"peak up to backward: {_rss_kb('VmHWM') // 1024} MiB")
    live("after backward")
    opt.step()
    opt.zero_grad(set_to_none=True)
    live("after step")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), "--copy" in sys.argv[4:])

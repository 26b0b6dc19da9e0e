"""Optimizer state bytes after one step: torch.optim.AdamW against tunelab's AdamW8bit, full fine-tune of
the bundled SmolLM2-135M (fp32), one batch of 2 x 64 tokens.

    python benchmarks/optim8bit_state.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))


def main() -> None:
    from transformers import AutoModelForCausalLM

    from tunelab.models.bundled import model_dir
    from tunelab.train.optim8bit import AdamW8bit

    for name, make in (("torch AdamW", torch.optim.AdamW), ("tunelab AdamW8bit", AdamW8bit)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dir(), dtype=torch.float32)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make(params, lr=1e-5)
        ids = torch.randint(0, model.config.vocab_size, (2, 64))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        n = sum(p.numel() for p in params)
        b = state_bytes(opt)
        print(f"{name:18s} {n:,} trainable parameters, optimizer state {b / 2**20:8.1f} MiB = {b / n:.3f} bytes/param")


if __name__ == "__main__":
    main()

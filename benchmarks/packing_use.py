"""How much of each step's compute holds tokens, padded against packed (docs/data.md, Packing).

For a config's SFT data (default configs/lora-sft.yaml: local:qa with the bundled tokenizer, seq_len 256,
batch 8) builds the training rows both ways and collates them as the loop does, in the loop's order for one
epoch: per step, the positions the model computes (B x T of the collated batch), the real tokens among them,
the examples and the label tokens. Counts, not time.

    python benchmarks/packing_use.py [CONFIG]
"""

from __future__ import annotations

import sys

import torch

from tunelab.config import load_config
from tunelab.data.pipeline import build
from tunelab.train.run import early_tokenizer


def use(rows, batch_size: int, seed: int, pad_id: int) -> dict:
    from tunelab.train.loop import collate

    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed * 100003))
    steps = len(rows) // batch_size
    computed = real = labels = examples = 0
    for s in range(steps):
        part = [rows[int(i)] for i in order[s * batch_size:(s + 1) * batch_size]]
        batch = collate(part, pad_id, "cpu")
        computed += batch["input_ids"].numel()
        real += sum(len(r["input_ids"]) - sum(1 for t, y in zip(r["input_ids"], r["labels"]) if t == pad_id and y == -100)
                    for r in part)
        labels += int((batch["labels"][:, 1:] != -100).sum())
        examples += sum(1 + sum(1 for p in r["position_ids"][1:] if p == 0) for r in part)
    return {"steps": steps, "computed/step": computed / steps, "real tokens/step": real / steps,
            "use": real / computed, "label tokens/step": labels / steps, "examples/step": examples / steps}


def main(path: str = "configs/lora-sft.yaml") -> None:
    cfg = load_config(path)
    tok = early_tokenizer(cfg)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for packing in ("padded", "packed"):
        data = cfg.data.model_copy(update={"packing": packing})
        rows = build(data, tok, cfg.train.seq_len, cfg.train.seed).train
        u = use(rows, cfg.train.batch_size, cfg.train.seed, pad)
        print(f"{packing:7s} rows {len(rows):5d}  " + "  ".join(f"{k} {v:.3g}" for k, v in u.items()))


if __name__ == "__main__":
    main(*sys.argv[1:])

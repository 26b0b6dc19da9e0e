"""A tiny model folder, an SFT file and run configs for the reliability tests (crash, faults, bad input)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

from tests.support.tiny_models import make_tiny_llama, make_tiny_tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda sigma omega".split()


def make_workspace(d: Path, records: int = 64) -> Path:
    """d/model (a 2-layer random Llama + tokenizer, safetensors) and d/sft.jsonl (word-reversal pairs)."""
    tok = make_tiny_tokenizer()
    make_tiny_llama(vocab_size=len(tok)).save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    rng = random.Random(0)
    with open(d / "sft.jsonl", "w") as f:
        for _ in range(records):
            w = rng.sample(WORDS, 4)
            f.write(json.dumps({"prompt": "Reverse: " + " ".join(w), "response": " ".join(w[::-1])}) + "\n")
    return d


def run_config(ws: Path, out: Path, **extra) -> Path:
    """A LoRA SFT run on the workspace, written beside `out` as YAML; `extra` updates sections or keys."""
    cfg = {
        "method": "lora",
        "model": {"source": str(ws / "model")},
        "lora": {"r": 4, "alpha": 8},
        "data": {"task": "sft", "sources": [{"name": "rev", "path": str(ws / "sft.jsonl")}],
                 "packing": "padded", "eval_fraction": 0.0},
        "train": {"lr": 1e-2, "batch_size": 4, "max_steps": 3, "seq_len": 64, "warmup_steps": 1},
        "output_dir": str(out),
    }
    for k, v in extra.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

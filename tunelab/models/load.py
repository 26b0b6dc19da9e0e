"""Where a model comes from: the bundled default, a local Hugging Face folder, a GGUF file, or from scratch."""

from __future__ import annotations

import hashlib
import sys
import warnings
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.models import bundled


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":  # fp32 is the fast path on CPU (bf16 matmul is slow there); bf16 on CUDA
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def gguf_folder(path: Path) -> Path:
    """Convert a user's GGUF file once into a cached HF folder (keyed by path, size and mtime)."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":  # every GGUF file starts with these 4 bytes (ggml/docs/gguf.md)
        raise TunelabError(f"model.source: {path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); "
                           "give a real .gguf model or a Hugging Face folder")
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    dest = bundled.cache_root() / "gguf" / f"{path.stem}-{key}"
    if not (dest / "model.safetensors").is_file():
        try:
            bundled.convert_gguf(path, dest)
        except (ValueError, OSError, KeyError, IndexError, EOFError) as e:  # what gguf raises on a cut-short file
            raise TunelabError(f"model.source: {path}: not a readable GGUF model ({str(e).splitlines()[0]}); "
                               "the file may be truncated: download it again") from e
    return dest


def model_folder(source: str) -> Path:
    """The HF folder for a model source (`bundled`, a folder, or a `.gguf` file)."""
    if source == "bundled":
        return bundled.model_dir()
    path = Path(source).expanduser()
    if not path.exists():
        raise TunelabError(
            f"model.source: {source}: no such file or folder "
            "(give a local Hugging Face folder, a .gguf file, `bundled`, or `scratch`)"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise TunelabError(f"model.source: {source}: a file must be a .gguf model; otherwise give its folder")
        return gguf_folder(path)
    if not (path / "config.json").is_file():
        raise TunelabError(f"model.source: {path}: no config.json, so it is not a Hugging Face model folder")
    has_safetensors = any(path.glob("*.safetensors"))
    if not has_safetensors and any(path.glob("*.bin")) | any(path.glob("*.pt")):
        raise TunelabError(
            f"model.source: {path}: weights are pickle files (.bin/.pt), which can run code when loaded; "
            "convert them to safetensors first (tunelab loads safetensors only)"
        )
    return path


def load_tokenizer(folder: Path | str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise TunelabError(f"{folder}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_pretrained(source: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """(model, tokenizer) from `bundled`, an HF folder or a .gguf file; safetensors only, no remote code by default."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    folder = model_folder(source)
    if trust_remote_code:
        code = sorted(p.name for p in Path(folder).glob("*.py")) or ["none found yet"]
        message = (f"model.trust_remote_code=true: Python files shipped with {folder} ({', '.join(code)}) will run "
                   "on this machine with your permissions; turn it off unless you have read them")
        print(f"tunelab: WARNING: {message}", file=sys.stderr)
        warnings.warn(message, stacklevel=2)
    tok = load_tokenizer(folder, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, SafetensorError) as e:  # e.g. a truncated or mislabelled .safetensors file
        raise TunelabError(f"{folder}: cannot load the model ({str(e).splitlines()[0]}); check that its "
                           "config.json and *.safetensors files are complete (download them again)") from e
    return model, tok


def from_scratch(scratch, tokenizer, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A randomly initialised Llama-style model sized by a ScratchConfig, for pretraining."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if scratch.hidden_size % scratch.num_attention_heads:
        raise TunelabError("model.scratch: hidden_size must be a multiple of num_attention_heads")
    if scratch.num_attention_heads % scratch.num_key_value_heads:
        raise TunelabError("model.scratch: num_attention_heads must be a multiple of num_key_value_heads")
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=scratch.hidden_size,
        intermediate_size=scratch.intermediate_size,
        num_hidden_layers=scratch.num_hidden_layers,
        num_attention_heads=scratch.num_attention_heads,
        num_key_value_heads=scratch.num_key_value_heads,
        max_position_embeddings=scratch.max_position_embeddings,
        tie_word_embeddings=scratch.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(dtype)

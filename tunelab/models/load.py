"""Where a model comes from: the bundled default, a local Hugging Face folder, a GGUF file, or from scratch."""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.hub import HUB_ID, snapshot
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


# What a model needs from its repository: config, safetensors weights, tokenizer and chat template files.
# Pickled weights (*.bin, *.pt) are never fetched.
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def hub_folder(repo_id: str, revision: str | None = None) -> Path:
    """The snapshot folder of a Hub model in the Hugging Face cache (tunelab.hub.snapshot): safetensors and
    tokenizer files only. `revision`: a branch, tag or commit hash (default main)."""
    return snapshot(repo_id, revision, HUB_FILES)


def model_folder(source: str, revision: str | None = None) -> Path:
    """The HF folder for a model source: `bundled`, a local folder, a `.gguf` file, or a Hub id `org/name`
    (through the Hugging Face cache, at `revision`)."""
    if source == "bundled":
        return bundled.model_dir()
    path = Path(source).expanduser()
    if not path.exists() and HUB_ID.fullmatch(source):
        path = hub_folder(source, revision)
    if not path.exists():
        raise TunelabError(
            f"model.source: {source}: no such file or folder "
            "(give a local Hugging Face folder, a Hub id such as Qwen/Qwen2.5-0.5B-Instruct, a .gguf file, "
            "`bundled`, or `scratch`)"
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


def load_pretrained(source: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, quant=None,
                    revision: str | None = None):
    """(model, tokenizer) from `bundled`, an HF folder or a .gguf file; safetensors only, no remote code by default.

    With `quant` (a QuantConfig: quant_type, block_size, double_quant) the linears come out as frozen 4-bit
    tunelab.quant.Linear4bit, quantized one tensor at a time as the shards are read (load_quantized); the
    result is the same as loading in `dtype` and then quantize_model.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    folder = model_folder(source, revision)
    if trust_remote_code:
        code = sorted(p.name for p in Path(folder).glob("*.py")) or ["none found yet"]
        message = (f"model.trust_remote_code=true: Python files shipped with {folder} ({', '.join(code)}) will run "
                   "on this machine with your permissions; turn it off unless you have read them")
        print(f"tunelab: WARNING: {message}", file=sys.stderr)
        warnings.warn(message, stacklevel=2)
    tok = load_tokenizer(folder, trust_remote_code)
    try:
        if quant is not None:
            model = load_quantized(folder, quant, dtype, trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, **_mxfp4_as_float(folder)
            )
    except (OSError, ValueError, SafetensorError) as e:  # e.g. a truncated or mislabelled .safetensors file
        raise TunelabError(f"{folder}: cannot load the model ({str(e).splitlines()[0]}); check that its "
                           "config.json and *.safetensors files are complete (download them again)") from e
    return model, tok


def _is_mxfp4(config) -> bool:
    """Whether a checkpoint's config says its weights are MXFP4 (gpt-oss as released: experts in 4-bit blocks)."""
    q = getattr(config, "quantization_config", None)
    return (q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)) == "mxfp4"


def _mxfp4_as_float(folder: Path) -> dict:
    """from_pretrained's arguments that de-quantize MXFP4 expert weights to float as they load (transformers' own
    Mxfp4Config(dequantize=True)); without them transformers looks for GPU kernels on the Hub. {} otherwise."""
    from transformers import AutoConfig, Mxfp4Config

    return {"quantization_config": Mxfp4Config(dequantize=True)} if _is_mxfp4(AutoConfig.from_pretrained(folder)) else {}


@contextmanager
def _parameters_on_meta():
    """Inside the block new parameters live on the meta device (no memory, no init); buffers stay real.

    Buffers such as the rotary inv_freq are computed in __init__ and never saved, so they must be real;
    parameters all come from the checkpoint. (accelerate's init_empty_weights(include_buffers=False).)
    """
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def safetensors_keys(file: Path | str, fix: str) -> list[str]:
    """The tensor names in a safetensors file's header (no tensor is read); a broken file is one clear error
    ending in `fix` (what to do about it)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), "pt") as f:
            return list(f.keys())
    except (OSError, SafetensorError) as e:  # a truncated or mislabelled file
        raise TunelabError(f"{file}: not a readable safetensors file ({str(e).splitlines()[0]}); {fix}") from e


def shard_files(folder: Path) -> list[Path]:
    """The safetensors files of a HF folder: those `model.safetensors.index.json` names, else model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())  # in order, once each
        return [folder / n for n in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise TunelabError(f"{folder}: neither model.safetensors nor model.safetensors.index.json")


def load_quantized(folder: Path, quant, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                   skip: tuple[str, ...] = ("lm_head",)):
    """A HF causal LM whose linears (except `skip`, as quantize_model) are frozen 4-bit, built tensor by tensor.

    The model is made on the meta device; each shard is opened with safetensors.safe_open and read one tensor
    at a time: a targeted linear weight is cast to `dtype` and quantized at once (its float copy is dropped),
    every other tensor is cast and put in place. So peak memory is the 4-bit model plus one float tensor,
    never the whole model in 16/32 bits (docs/training.md measures it). MoE experts stored one linear per
    expert are stacked into the model's 3-D parameters as transformers does (tunelab.models.moe_files), and an
    experts module is quantized (Experts4bit) once its weights are in: one layer's experts in float at a time.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from tunelab.models.moe_files import ExpertStacker, renamed
    from tunelab.quant.experts import Experts4bit, expert_weight_names
    from tunelab.quant.linear import Linear4bit, is_skipped

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    mxfp4 = _is_mxfp4(config)
    if mxfp4:  # its expert blocks are de-quantized below, then stored in our 4 bits: the model is not MXFP4
        del config.quantization_config
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    targets = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not is_skipped(name, skip)}
    names = dict(model.named_parameters())
    stacker = ExpertStacker({n: p.shape for n, p in names.items()})
    halves: dict[str, dict[str, torch.Tensor]] = {}  # MXFP4 "_blocks" / "_scales" waiting for the other one
    for path in shard_files(folder):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                t = None
                weight, _, part = key.rpartition("_")
                if mxfp4 and part in ("blocks", "scales") and weight in names:  # one layer's experts, packed
                    halves.setdefault(weight, {})[part] = f.get_tensor(key)
                    if len(halves[weight]) < 2:
                        continue
                    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

                    packed = halves.pop(weight)  # transformers' own de-quantization, to the (E, in, out) parameter
                    key, t = weight, convert_moe_packed_tensors(packed["blocks"], packed["scales"], dtype=dtype)
                elif key not in names and renamed(key) in names:
                    key, t = renamed(key), f.get_tensor(key)
                elif key not in names and stacker.target(key):  # one expert's linear: a piece of a 3-D weight
                    stacked = stacker.add(key, f.get_tensor(key).to(dtype, copy=True))
                    if stacked is None:
                        continue
                    key, t = stacked
                elif key not in names:
                    raise TunelabError(f"{path}: tensor {key} is not a parameter of {type(model).__name__}; "
                                       "load this model with method=lora (whole, then quantize) instead")
                if t is None:
                    t = f.get_tensor(key)  # a view of the memory-mapped shard: pages are read as they are touched
                module_name, _, attr = key.rpartition(".")
                if module_name in targets and attr == "weight":
                    t = t.to(dtype)
                    linear = model.get_submodule(module_name)
                    linear.weight = torch.nn.Parameter(t, requires_grad=False)
                    model.set_submodule(module_name, Linear4bit.from_linear(linear, quant.quant_type, quant.block_size,
                                                                            quant.double_quant))
                    linear.weight = None  # the float weight goes now, not at the end
                    continue
                # an own copy: one live view would keep the whole shard mapped, with every page read through it
                t = t.to(dtype, copy=True) if t.is_floating_point() else t.clone()
                module = model.get_submodule(module_name)
                if isinstance(module, Experts4bit):  # quantized already: its other parameters (gpt-oss's biases)
                    module = module.base             # are the wrapped module's
                module._parameters[attr] = torch.nn.Parameter(t, requires_grad=module._parameters[attr].requires_grad)
                experts = expert_weight_names(module)
                if attr in experts and not is_skipped(module_name, skip) and not any(
                        module._parameters[n].is_meta for n in experts):
                    model.set_submodule(module_name, Experts4bit.from_experts(
                        module, quant.quant_type, quant.block_size, quant.double_quant, path=module_name))
    model.tie_weights()  # e.g. lm_head.weight = embed_tokens.weight when config.tie_word_embeddings (not saved twice)
    missing = [n for n, prm in model.named_parameters() if prm.is_meta]
    if missing:
        raise TunelabError(f"{folder}: the checkpoint has no {', '.join(missing[:3])}"
                           f"{' ...' if len(missing) > 3 else ''}; its files may be incomplete (download them again)")
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()  # as from_pretrained returns it


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

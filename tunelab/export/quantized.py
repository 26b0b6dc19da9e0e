"""Loading a 4-bit model folder (`tunelab quantize --save`, or transformers + bitsandbytes' save_pretrained).

The folder is an HF folder (config.json, tokenizer) whose safetensors hold bitsandbytes' Linear4bit
state-dict layout for each quantized linear:
  <path>.weight                                   uint8 (ceil(out*in/2), 1), two 4-bit codes per byte
  <path>.weight.absmax / .quant_map               per-block scales, the 16-value code book
  [<path>.weight.nested_absmax / .nested_quant_map]  double quantization
  <path>.weight.quant_state.bitsandbytes__nf4     JSON (shape, blocksize, dtype, ...) as uint8
and plain tensors for everything else. The model is built from config.json, each such linear becomes a
tunelab Linear4bit, and every tensor is loaded with strict key checks.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tunelab.errors import TunelabError

QUANT_STATE = ".weight.quant_state.bitsandbytes__"


def _safetensors_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _quantized_paths(keys) -> list[str]:
    """Module paths that have a bitsandbytes 4-bit weight among the state-dict keys."""
    return sorted({k.split(QUANT_STATE)[0] for k in keys if QUANT_STATE in k})


def is_quantized_folder(folder: Path) -> bool:
    """True if the folder's safetensors hold bitsandbytes-layout 4-bit weights."""
    from tunelab.models.load import safetensors_keys

    fix = "the download or copy may be incomplete: fetch it again"
    return any(_quantized_paths(safetensors_keys(file, fix)) for file in _safetensors_files(folder))


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = _safetensors_files(folder)
    if not files:
        raise TunelabError(f"{folder}: no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    return state


def load_quantized(folder: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a 4-bit folder: quantized linears become tunelab.quant.Linear4bit.

    Raises TunelabError naming the first key that is missing, unexpected, or of the wrong shape.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.models.load import load_tokenizer
    from tunelab.quant import Linear4bit, QuantizedTensor

    folder = Path(folder)
    state = read_state_dict(folder)
    config = AutoConfig.from_pretrained(folder)
    # transformers would hand a quantization_config to bitsandbytes; tunelab does the 4-bit part itself.
    config.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)  # random init, overwritten below
    for path in _quantized_paths(state):
        try:
            linear = model.get_submodule(path)
        except AttributeError:
            raise TunelabError(f"{folder}: 4-bit weight {path}.weight matches no module of "
                               f"{type(model).__name__}") from None
        qweight = QuantizedTensor.from_bnb_state_dict(state, prefix=path + ".")
        if not isinstance(linear, nn.Linear) or tuple(qweight.shape) != tuple(linear.weight.shape):
            raise TunelabError(f"{folder}: 4-bit weight {path}.weight has shape {tuple(qweight.shape)}, the "
                               f"model's layer is {type(linear).__name__} {tuple(getattr(linear, 'weight').shape)}")
        bias = state.get(path + ".bias")
        model.set_submodule(path, Linear4bit(qweight, bias, compute_dtype=None))
    result = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        what = f"no tensor for {missing[0]}" if missing else f"unexpected tensor {result.unexpected_keys[0]}"
        raise TunelabError(f"{folder}: {what} ({len(missing)} missing, {len(result.unexpected_keys)} "
                           "unexpected): the weights do not fit config.json")
    if tied:
        model.tie_weights()
    return model.eval(), load_tokenizer(folder)

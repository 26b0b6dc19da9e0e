"""A LoRA adapter as a GGUF adapter file that llama.cpp applies to its base model at load (`--lora FILE`).

The format llama.cpp reads (src/llama-adapter.cpp; its convert_lora_to_gguf.py writes it):
  - general.architecture: the base's architecture (llama.cpp refuses an adapter of another one);
    general.type = "adapter", adapter.type = "lora", adapter.lora.alpha (f32);
  - per adapted matrix W (llama.cpp name, e.g. blk.0.attn_q.weight) two tensors: `W.lora_a` = A (r, in) and
    `W.lora_b` = B (out, r), as PEFT stores them; B's rows in llama.cpp's order of W's rows (q/k permuted for
    the llama architecture, like W itself);
  - llama.cpp adds (alpha / r) * B @ (A @ x), r read off A's shape, so `alpha` = the layer's scale * r
    (alpha for plain LoRA, alpha * sqrt(r) for rsLoRA).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from tunelab.errors import TunelabError

ADAPTER_DTYPES = ("f32", "f16")


def export_gguf_adapter(model: nn.Module, out: str | os.PathLike, dtype: str = "f32") -> Path:
    """Write the LoRA layers of `model` (a SUPPORTED family with unmerged LoRALinear layers) to `out`."""
    import gguf

    from tunelab.export.gguf import (
        SUPPORTED,
        _check_replaceable,
        _tmp_beside,
        gguf_arch,
        gguf_name,
        publish,
        rows_for_llama_cpp,
        tensor_names,
    )
    from tunelab.lora import lora_layers
    from tunelab.lora.experts import LoRAExperts
    from tunelab.lora.layer import ModuleToSave

    if dtype not in ADAPTER_DTYPES:
        raise TunelabError(f"GGUF adapter dtype must be one of {', '.join(ADAPTER_DTYPES)}, got {dtype!r}")
    config = model.config
    if config.model_type not in SUPPORTED:
        raise TunelabError(f"GGUF adapter export does not support the {config.model_type!r} family; "
                           f"supported: {', '.join(SUPPORTED)}")
    layers = list(lora_layers(model))
    if not layers:
        raise TunelabError("this model has no LoRA layers: a GGUF adapter needs an adapter (a run or --adapter)")
    alphas = {layer.scale * layer.r for _, layer in layers}  # llama.cpp's one alpha for every layer
    if any(layer.use_dora or layer.merged for _, layer in layers) or len(alphas) > 1:
        raise TunelabError("a GGUF adapter holds plain LoRA with one scale (alpha / r) for all layers; this adapter "
                           "uses DoRA, different ranks/alphas, or is merged: export the merged model instead")
    if any(isinstance(m, LoRAExperts) for m in model.modules()):
        raise TunelabError("this adapter has LoRA on MoE experts (lora.target_experts), which a GGUF LoRA adapter "
                           "does not hold here: export the merged model instead")
    if any(isinstance(m, ModuleToSave) for m in model.modules()):
        raise TunelabError("this adapter trains whole modules (modules_to_save), which a GGUF LoRA adapter cannot "
                           "hold: export the merged model instead")
    out = Path(out)
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = tensor_names(config)
    np_dtype, qtype = {"f32": ("float32", gguf.GGMLQuantizationType.F32),
                       "f16": ("float16", gguf.GGMLQuantizationType.F16)}[dtype]
    tmp = _tmp_beside(out)
    try:
        writer = gguf.GGUFWriter(tmp, gguf_arch(config))
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alphas.pop()))
        for path, layer in layers:
            key = f"{path}.weight"
            name = gguf_name(names, config, key)
            a = layer.lora_A.weight.detach().to("cpu", torch.float32)                              # (r, in)
            b = rows_for_llama_cpp(config, key, layer.lora_B.weight.detach().to("cpu", torch.float32))  # (out, r)
            writer.add_tensor(f"{name}.lora_a", a.numpy().astype(np_dtype), raw_dtype=qtype)
            writer.add_tensor(f"{name}.lora_b", b.numpy().astype(np_dtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        publish(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out

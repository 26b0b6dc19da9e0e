"""MODEL_OR_RUN -> a ready model: a run folder, an adapter folder, an HF folder, a 4-bit folder, a .gguf, `bundled`.

A run folder (config.yaml + adapter/ or model/) says how it was trained: for a qlora run, "the adapter applied
on the fly" means the base re-quantized with the run's quant settings and the adapter loaded on top, which
is exactly the model that was trained. Merging goes into the original full-precision weights, which are
kept aside before quantizing (see tunelab.lora.merge_lora).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tunelab.config import RunConfig, load_config
from tunelab.errors import TunelabError

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class Source:
    """Where a model comes from: a loadable base, and optionally an adapter trained on it.

    base:    `bundled`, an HF folder, a 4-bit folder (tunelab quantize --save) or a .gguf file
    adapter: a PEFT-layout adapter folder, or None
    quant:   for a QLoRA adapter, the run's quant settings {quant_type, block_size, double_quant}; else None
    run:     the run folder it came from (its config.yaml records model.dtype), or None
    """

    base: str
    adapter: Path | None = None
    quant: dict | None = None
    run: Path | None = None


@dataclass
class Opened:
    """A loaded model, its tokenizer, and where they came from.

    base_weights: for a QLoRA adapter, the base's full-precision linear weights before quantizing
    (state-dict keys), the weights a merge goes into; None otherwise.
    """

    model: nn.Module
    tokenizer: object
    source: Source
    merged: bool = False
    base_weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)


def find_source(path_or_run: str, adapter: str | None = None, base: str | None = None) -> Source:
    """Classify MODEL_OR_RUN (plus an optional separate adapter and --base) into a Source; loads nothing."""
    if path_or_run == "bundled" or Path(path_or_run).suffix == ".gguf":
        src = Source(base=path_or_run)
    else:
        path = Path(path_or_run).expanduser()
        if not path.exists():
            raise TunelabError(f"{path_or_run}: no such file or folder (give a run folder, an adapter folder, "
                               "a Hugging Face folder, a .gguf file, or `bundled`)")
        if (path / "config.yaml").is_file() and ((path / "adapter").is_dir() or (path / "model").is_dir()):
            src = _run_source(path)
        elif (path / ADAPTER_CONFIG).is_file():
            src = _adapter_source(path, base)
        elif (path / "config.json").is_file():
            src = Source(base=str(path))
        else:
            raise TunelabError(
                f"{path}: not a run folder (config.yaml + adapter/ or model/), an adapter folder "
                f"({ADAPTER_CONFIG}) or a Hugging Face model folder (config.json)"
            )
    if base is not None:
        if src.adapter is None and adapter is None:
            raise TunelabError(f"--base {base} is the base of an adapter, but {path_or_run} has none; "
                               "give an adapter or run folder, or --adapter")
        src.base = base
    if adapter is not None:
        if src.adapter is not None:
            raise TunelabError(f"{path_or_run} already has an adapter ({src.adapter}); give a base model with "
                               "--adapter, or the adapter/run alone")
        extra = _adapter_source(Path(adapter).expanduser(), src.base)
        src.adapter, src.quant, src.run = extra.adapter, extra.quant, extra.run
    return src


def _run_config(run: Path) -> RunConfig:
    """The run's config.yaml as tunelab train wrote it, validated as any config (the same defaults)."""
    return load_config(run / "config.yaml")


def _run_source(run: Path) -> Source:
    """A run folder written by tunelab train: its config says the base and (for qlora) the quant settings."""
    cfg = _run_config(run)
    if (run / "model").is_dir():
        return Source(base=str(run / "model"))
    if cfg.model.source == "scratch":
        raise TunelabError(f"{run}: a scratch run has no base model to put its adapter on")
    quant = cfg.quant.model_dump() if cfg.method == "qlora" else None  # {quant_type, block_size, double_quant}
    return Source(base=cfg.model.source, adapter=run / "adapter", quant=quant, run=run)


def _adapter_source(adapter: Path, base: str | None) -> Source:
    """An adapter folder: base from --base, else the run around it, else adapter_config.json's base name."""
    from tunelab.lora import read_adapter_config

    _, recorded = read_adapter_config(adapter)  # also checks it is a LoRA adapter folder
    run = adapter.parent
    if (run / "config.yaml").is_file() and adapter.name == "adapter":
        src = _run_source(run)
        return Source(base=base or src.base, adapter=adapter, quant=src.quant, run=run)
    if base is None and not recorded:
        raise TunelabError(f"{adapter / ADAPTER_CONFIG} names no base_model_name_or_path: pass --base MODEL")
    return Source(base=base or recorded, adapter=adapter)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_CONFIG_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def pick_device(name: str = "auto") -> torch.device:
    """`auto` (CUDA when torch sees a GPU, else CPU), `cpu`, `cuda` or `cuda:N`; CUDA asked for and absent is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TunelabError(f"--device {name!r}: give auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TunelabError(f"--device {name}: torch sees no CUDA GPU on this machine; use --device cpu (or auto)")
    if device.type not in ("cpu", "cuda"):
        raise TunelabError(f"--device {name!r}: give auto, cpu, cuda or cuda:N")
    return device


def pick_dtype(name: str, device: torch.device, src: Source | None = None) -> torch.dtype:
    """bf16 | fp16 | fp32; `auto`: fp32 on CPU (bf16 matmuls are slow there), bf16 on CUDA; `base`: the
    base model's own dtype (`base_dtype`)."""
    if name == "base":
        return DTYPES[base_dtype(src)]
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise TunelabError(f"--dtype {name!r}: give one of {', '.join(DTYPES)}, auto")
    return DTYPES[name]


def base_dtype(src: Source) -> str:
    """The dtype the base's weights are stored in: its config.json's `dtype` (`torch_dtype` before
    transformers 5), else the run's model.dtype, else fp32 (a .gguf or 4-bit folder loads as fp32)."""
    from tunelab.export.quantized import is_quantized_folder
    from tunelab.models.load import model_folder

    folder = Path(src.base) if Path(src.base).is_dir() else None
    if src.base == "bundled":
        folder = model_folder("bundled")
    if folder is not None and (folder / "config.json").is_file() and not is_quantized_folder(folder):
        cfg = json.loads((folder / "config.json").read_text())
        name = _CONFIG_DTYPES.get(str(cfg.get("dtype") or cfg.get("torch_dtype")))
        if name:
            return name
    if src.run is not None:
        name = _CONFIG_DTYPES.get(_run_config(src.run).model.dtype)
        if name:
            return name
    return "fp32"


def load_base(base: str, quant: dict | None = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, base_weights): the base model, 4-bit as `quant` says (then base_weights holds
    the full-precision linear weights it replaced, for merging), else base_weights is None."""
    from tunelab.export.quantized import is_quantized_folder, load_quantized
    from tunelab.models.load import load_pretrained

    if Path(base).is_dir() and is_quantized_folder(Path(base)):
        model, tok = load_quantized(base)  # already 4-bit: no original weights to merge into
        return model, tok, None
    model, tok = load_pretrained(base, dtype)
    model.eval()
    if quant is None:
        return model, tok, None
    from tunelab.quant import quantize_model

    # The linear weights quantize_model replaces, kept to merge into. Not cloned: quantize_model swaps the
    # modules and leaves these tensors alone, so they are the only full-precision copy (no second one).
    from tunelab.quant.experts import expert_modules, expert_weight_names

    linears = {p for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    experts = {f"{p}.{n}" for p, m in expert_modules(model) for n in expert_weight_names(m)}  # MoE: 3-D weights
    base_weights = {k: v.detach() for k, v in model.state_dict().items()
                    if k.rsplit(".", 1)[0] in linears or k in experts}
    quantize_model(model, **quant)
    return model, tok, base_weights


def open_model(path_or_run: str, adapter: str | None = None, base: str | None = None, merge: bool = False,
               from_quantized: bool = False, dtype: torch.dtype | str = torch.float32,
               device: torch.device | str = "cpu", kernels: str = "off") -> Opened:
    """Load MODEL_OR_RUN (see the module doc) with its adapter applied on the fly, or merged if `merge`.

    A QLoRA adapter merges into the original full-precision base weights unless `from_quantized`, which
    merges into the de-quantized 4-bit weights (warns: it keeps their rounding error). dtype: a torch dtype
    or a `pick_dtype` name (bf16, fp16, fp32, auto, base); device: a `pick_device` name or torch.device.
    The model is loaded on the CPU and then moved; a QLoRA base's original weights stay on the CPU.
    kernels: auto | off | strict, the speed-ups this instance gets, as train.kernels (tunelab.accel.kernels);
    off (the default here) is the plain reference path.
    """
    src = find_source(path_or_run, adapter, base)
    device = device if isinstance(device, torch.device) else pick_device(device)
    dtype = dtype if isinstance(dtype, torch.dtype) else pick_dtype(dtype, device, src)
    model, tok, base_weights = load_base(src.base, src.quant, dtype)
    if src.adapter is not None:
        from tunelab.lora import load_adapter

        load_adapter(model, src.adapter, verbose=False)
    opened = Opened(model.to(device), tok, src, base_weights=base_weights)
    opened = merge_opened(opened, from_quantized) if merge else opened
    with_kernels(opened.model, kernels, device)
    return opened


def with_kernels(model: nn.Module, mode: str, device: torch.device | str) -> nn.Module:
    """Give a model opened for inference the speed-ups of `mode` (auto | off | strict, as train.kernels) on
    `device`, once its adapter and 4-bit layers are in; `auto` says in one line what it turned off."""
    from tunelab.accel import kernels as accel

    chosen = accel.choose(model, mode, device)
    accel.report(chosen)
    accel.apply(model, chosen)
    return model


def merge_opened(opened: Opened, from_quantized: bool = False) -> Opened:
    """Fold the adapter of an opened model into plain linears, in place (no-op without an adapter)."""
    from tunelab.lora import merge_lora
    from tunelab.lora.layer import is_quantized_linear

    if opened.source.adapter is not None and not opened.merged:
        weights = None if from_quantized else opened.base_weights
        if weights is None and not from_quantized and any(is_quantized_linear(m) for m in opened.model.modules()):
            raise TunelabError(
                f"the base {opened.source.base} is 4-bit, so its original weights are not here to merge into: "
                "pass --base <the full-precision model it was quantized from>, or --from-quantized to merge "
                "into the de-quantized 4-bit weights (keeps their rounding error)")
        device = next(opened.model.parameters()).device
        merge_lora(opened.model, base_weights=weights, from_quantized=from_quantized)
        opened.model.to(device)  # linears rebuilt from CPU-held base weights join the rest
        opened.merged = True
    return opened


def stop_ids(model: nn.Module, tokenizer) -> list[int]:
    """EOS ids of the tokenizer and the model's generation config (a chat turn's end may be either)."""
    from tunelab.eval.generate import _stop_ids

    try:
        return _stop_ids(model, tokenizer)
    except ValueError:
        raise TunelabError("neither the tokenizer nor the model's generation config names an EOS token, so "
                           "generation could never stop: set eos_token in the tokenizer's config") from None

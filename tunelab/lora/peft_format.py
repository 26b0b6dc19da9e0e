"""Adapters on disk in PEFT's layout: adapter_config.json + adapter_model.safetensors.

Keys are PEFT 0.21's (peft/utils/save_and_load.py, adapter name stripped):
  base_model.model.<path>.lora_A.weight          (r, in)
  base_model.model.<path>.lora_B.weight          (out, r)
  base_model.model.<path>.lora_magnitude_vector  (out,)   DoRA only
  base_model.model.<path>.<param>                         modules_to_save: the trained copy's state
  base_model.model.<experts>[.base_layer...].lora_A.weight  (E*r, in), lora_B.weight (out, r*E): expert weights
                                                          (target_parameters; layout in tunelab/lora/experts.py)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab.errors import TunelabError
from tunelab.lora.config import LoraConfig
from tunelab.lora.experts import LoRAExperts
from tunelab.lora.layer import LoRALinear, ModuleToSave
from tunelab.lora.model import apply_lora, find_targets, lora_layers, matching_paths, remove_lora

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
# PEFT config fields whose non-default values change the adapter in ways tunelab does not implement.
UNSUPPORTED = {"fan_in_fan_out": False, "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {},
               "layers_to_transform": None, "layer_replication": None, "exclude_modules": None,
               "trainable_token_indices": None}
TASK_SUFFIXES = {"ForCausalLM": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
                 "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS"}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's file keys (views of the live parameters)."""
    state = {}
    for path, m in model.named_modules():
        if isinstance(m, LoRALinear):
            state[f"{PREFIX}{path}.lora_A.weight"] = m.lora_A.weight
            state[f"{PREFIX}{path}.lora_B.weight"] = m.lora_B.weight
            if m.use_dora:
                state[f"{PREFIX}{path}.lora_magnitude_vector"] = m.lora_magnitude_vector
        elif isinstance(m, LoRAExperts):
            # PEFT wraps each targeted parameter of a module in a ParamWrapper nested around the previous one,
            # in the module's order: the first is innermost, under one ".base_layer" per wrapper outside it.
            names = list(m.adapters)
            for i, name in enumerate(names):
                key = f"{PREFIX}{path}" + ".base_layer" * (len(names) - 1 - i)
                state[f"{key}.lora_A.weight"] = m.adapters[name].lora_A.weight
                state[f"{key}.lora_B.weight"] = m.adapters[name].lora_B.weight
        elif isinstance(m, ModuleToSave):
            state.update({f"{PREFIX}{path}.{k}": v for k, v in m.trained.state_dict(keep_vars=True).items()})
    return state


def save_adapter(model: nn.Module, path: str | os.PathLike, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter of a model prepared by apply_lora to the folder `path`, atomically.

    Both files go to a temporary folder beside `path`, which then replaces it, so a crash never leaves a
    half-written adapter that looks valid. An existing folder is only replaced if it holds nothing but
    adapter files. `state` replaces adapter_state_dict(model) (e.g. whole tensors gathered from FSDP shards).
    Returns the folder.
    """
    cfg = _lora_config_of(model)
    path = Path(path)
    if path.exists() and not _is_adapter_dir(path):
        raise TunelabError(f"{path} exists and holds files other than an adapter; choose an empty or new folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(model) if state is None else state
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(_peft_config(model, cfg), indent=2, sort_keys=True) + "\n")
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old)
    return path


def load_adapter(model: nn.Module, path: str | os.PathLike, verbose: bool = True) -> nn.Module:
    """Load a PEFT-layout LoRA adapter (written by tunelab or PEFT) into `model`, in place; returns it.

    A plain base model first gets the adapter's layers (apply_lora with the folder's config); a model that
    already has them must have the same r, alpha and variants. Reads safetensors only. Every tensor's
    shape is checked against the layer it goes to: a mismatch, a key that matches no layer, or a layer
    with no key is a TunelabError naming the module and shapes.
    """
    path = Path(path)
    cfg, base_name = read_adapter_config(path)
    if not (path / WEIGHTS_NAME).is_file():
        raise TunelabError(f"{path} has no {WEIGHTS_NAME} (tunelab reads safetensors adapters only)")
    found = load_file(path / WEIGHTS_NAME)
    if getattr(model, "lora_config", None) is not None:
        _check_same_adapter(model.lora_config, cfg, path)
        _copy_checked(model, found, path, base_name)
        return model
    _check_targets_fit(model, cfg, path)
    cfg.modules_to_save = _present(model, cfg.modules_to_save)
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    apply_lora(model, cfg, verbose=verbose)
    try:
        _copy_checked(model, found, path, base_name)
    except TunelabError:  # leave the model as it came: no adapter layers, its own trainable flags
        for name, p in remove_lora(model).named_parameters():
            p.requires_grad_(trainable[name])
        raise
    return model


def _copy_checked(model: nn.Module, found: dict[str, torch.Tensor], path: Path, base_name: str | None) -> None:
    """Copy the file's tensors into the adapter, after checking keys and shapes against the model."""
    expected = adapter_state_dict(model)
    unknown = sorted(set(found) - set(expected))
    if unknown:
        raise TunelabError(
            f"{path / WEIGHTS_NAME}: {len(unknown)} tensors match no LoRA layer or module to save in this "
            f"model, e.g. {unknown[0]}; the adapter was made for another model ({base_name or 'unnamed'})"
        )
    missing = sorted(set(expected) - set(found))
    if missing:
        raise TunelabError(f"{path / WEIGHTS_NAME}: no tensor for {missing[0]} ({len(missing)} missing in all)")
    for key, param in expected.items():
        if found[key].shape != param.shape:
            module = key[len(PREFIX):]
            raise TunelabError(
                f"adapter tensor {module} has shape {tuple(found[key].shape)} but this model's layer expects "
                f"{tuple(param.shape)}{_layer_shape(model, module)}; the adapter was trained on a base "
                f"model of a different shape ({base_name or 'unnamed'})"
            )
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(found[key])


def read_adapter_config(path: str | os.PathLike) -> tuple[LoraConfig, str | None]:
    """The LoraConfig in `path`/adapter_config.json and the base model name it records."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise TunelabError(f"{path} is not an adapter folder: no {CONFIG_NAME}")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TunelabError(f"{file}: not valid JSON ({e}); save the adapter again or fix the file") from None
    if not isinstance(raw, dict):
        raise TunelabError(f"{file}: expected a JSON object of LoRA settings, got {type(raw).__name__}")
    if raw.get("peft_type") != "LORA":
        raise TunelabError(f"{file}: peft_type is {raw.get('peft_type')!r}; tunelab loads LORA adapters only")
    for key, default in UNSUPPORTED.items():
        if raw.get(key, default) not in (default, [], {}, None):
            raise TunelabError(f"{file}: {key}={raw[key]!r} is not supported by tunelab.lora")
    missing = [k for k in ("r", "lora_alpha", "target_modules") if raw.get(k) is None]
    if missing:
        raise TunelabError(f"{file}: no value for {', '.join(missing)}; this is not a complete LoRA config")
    init = raw.get("init_lora_weights", True)
    cfg = LoraConfig(
        r=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout", 0.0),
        target_modules=raw["target_modules"], use_rslora=raw.get("use_rslora", False),
        use_dora=raw.get("use_dora", False), modules_to_save=raw.get("modules_to_save"),
        init="gaussian" if init == "gaussian" else "kaiming", bias=raw.get("bias", "none"),
        task_type=raw.get("task_type"), target_experts=raw.get("target_parameters") or False,
    )
    return cfg, raw.get("base_model_name_or_path")


def _peft_config(model: nn.Module, cfg: LoraConfig) -> dict:
    """adapter_config.json as PEFT 0.21 reads it (fields left out take PEFT's defaults)."""
    return {
        "peft_type": "LORA",
        "task_type": cfg.task_type or _task_type(model),
        "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": _saved_targets(model, cfg),
        "bias": cfg.bias,
        "use_rslora": cfg.use_rslora,
        "use_dora": cfg.use_dora,
        "modules_to_save": cfg.modules_to_save,
        "target_parameters": _saved_expert_targets(model),
        "init_lora_weights": "gaussian" if cfg.init == "gaussian" else True,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }


def _saved_targets(model: nn.Module, cfg: LoraConfig) -> str | list[str]:
    """target_modules as written: names or regex as given; "all-linear" as the full paths of the adapted
    layers (what PEFT 0.21 writes), so the file does not depend on how "all-linear" finds the head."""
    if cfg.target_modules != "all-linear":
        return cfg.target_modules
    return sorted(p for p, _ in lora_layers(model))


def _saved_expert_targets(model: nn.Module) -> list[str] | None:
    """target_parameters: the full paths of the adapted expert weights (PEFT matches them exactly), or None."""
    paths = sorted(f"{p}.{n}" for p, m in model.named_modules() if isinstance(m, LoRAExperts) for n in m.adapters)
    return paths or None


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    return next((t for suffix, t in TASK_SUFFIXES.items() if name.endswith(suffix)), None)


def _lora_config_of(model: nn.Module) -> LoraConfig:
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise TunelabError("this model has no LoRA adapter: call tunelab.lora.apply_lora(model, cfg) first")
    return cfg


def _is_adapter_dir(path: Path) -> bool:
    return path.is_dir() and all(p.name in (CONFIG_NAME, WEIGHTS_NAME, "README.md") for p in path.iterdir())


def _check_targets_fit(model: nn.Module, cfg: LoraConfig, path: Path) -> None:
    """Name the adapter folder when its target_modules do not fit this model."""
    try:
        find_targets(model, cfg.target_modules)
    except TunelabError as e:
        raise TunelabError(f"adapter {path}: {e}") from None


def _present(model: nn.Module, names: list[str] | None) -> list[str] | None:
    """The modules_to_save names that exist in the model. PEFT writes every candidate head name for a task
    (["classifier", "score"] for TOKEN_CLS) and skips absent ones; a tensor saved for a module that is
    absent still fails the key check in load_adapter."""
    kept = [n for n in names or [] if matching_paths(model, n)]
    return kept or None


def _check_same_adapter(have: LoraConfig, cfg: LoraConfig, path: Path) -> None:
    for field in ("r", "alpha", "use_rslora", "use_dora"):
        if getattr(have, field) != getattr(cfg, field):
            raise TunelabError(
                f"adapter {path} has {field}={getattr(cfg, field)!r} but the model's LoRA layers have "
                f"{field}={getattr(have, field)!r}; load it into the plain base model instead"
            )


def _layer_shape(model: nn.Module, module_key: str) -> str:
    """' (base linear 64 -> 128)' for the LoRA layer that a key belongs to, when there is one."""
    for path, layer in lora_layers(model):
        if module_key.startswith(path + "."):
            return f" (layer {path}: base linear {layer.base.in_features} -> {layer.base.out_features}, r={layer.r})"
    return ""

"""Putting adapters on a model: choosing targets, freezing the rest, enable/disable, merge, optimizer groups."""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from tunelab.errors import ConfigError, TunelabError
from tunelab.lora.config import LoraConfig
from tunelab.lora.experts import Experts4bit, LoRAExperts, apply_expert_lora, merge_experts
from tunelab.lora.layer import LoRALinear, ModuleToSave, base_weight, is_linear, is_quantized_linear


def apply_lora(model: nn.Module, cfg: LoraConfig, verbose: bool = True) -> nn.Module:
    """Wrap the target linears of `model` in LoRALinear, in place, and freeze everything else.

    Modules in cfg.modules_to_save get a trainable copy (the original stays frozen inside). Prints
    PEFT's "trainable params: X || all params: Y || trainable%: Z" line when verbose; the counts are also
    on `model.lora_counts` as (trainable, total). Returns the model, with `model.lora_config = cfg`.
    """
    if any(isinstance(m, (LoRALinear, LoRAExperts, ModuleToSave)) for m in model.modules()):
        raise TunelabError("this model already has LoRA adapters; apply_lora once, or merge_lora first")
    to_save = _modules_to_save(model, cfg.modules_to_save)
    targets = [path for path in find_targets(model, cfg.target_modules) if path not in to_save]
    _check_disjoint(targets, to_save)
    model.requires_grad_(False)
    for path in targets:
        layer = LoRALinear(model.get_submodule(path), cfg.r, cfg.alpha, cfg.dropout,
                           cfg.use_rslora, cfg.use_dora, cfg.init)
        model.set_submodule(path, layer)
    apply_expert_lora(model, cfg)  # cfg.target_experts: per-expert updates of the 3-D expert weights
    for path in to_save:
        model.set_submodule(path, ModuleToSave(model.get_submodule(path)))
    model.lora_config = cfg
    model.lora_counts = count_parameters(model)
    if verbose:
        trainable, total = model.lora_counts
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")
    return model


def find_targets(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """Paths of the linears that `target_modules` selects (see LoraConfig.target_modules).

    Raises TunelabError when a name or regex matches nothing, or matches a module that is not a linear.
    """
    if target_modules == "all-linear":
        head = _output_head_path(model)
        return [path for path, m in model.named_modules() if is_linear(m) and path != head]
    if isinstance(target_modules, str):
        found = [p for p, _ in model.named_modules() if p and re.fullmatch(target_modules, p)]
        _check_matches(model, f"regex {target_modules!r}", found)
        return found
    found = []
    for name in target_modules:
        matched = matching_paths(model, name)
        _check_matches(model, f"name {name!r}", matched)
        found += [p for p in matched if p not in found]
    return found


def matching_paths(model: nn.Module, name: str) -> list[str]:
    """Paths of the modules a name selects (name_matches), in model order."""
    return [path for path, _ in model.named_modules() if path and name_matches(path, name)]


def name_matches(path: str, name: str) -> bool:
    """PEFT's rule for name lists: the module path is the name or ends with "." + name."""
    return path == name or path.endswith("." + name)


def _check_matches(model: nn.Module, what: str, found: list[str]) -> None:
    if not found:
        linears = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if is_linear(m)})
        raise TunelabError(
            f"LoRA target_modules {what} matches no module in {type(model).__name__}; "
            f"its linear layers are named {linears} (regexes must match the full path, e.g. "
            f"'.*\\.(q_proj|v_proj)')"
        )
    for path in found:
        module = model.get_submodule(path)
        if not is_linear(module):
            raise TunelabError(
                f"LoRA target_modules {what} matches {path} ({type(module).__name__}), which is not a linear "
                "layer; LoRA wraps nn.Linear and tunelab 4-bit linears only"
            )


def _output_head_path(model: nn.Module) -> str | None:
    """The output head that "all-linear" leaves alone: get_output_embeddings() if the model has it, else lm_head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        return next(path for path, m in model.named_modules() if m is head)
    return "lm_head"


def _modules_to_save(model: nn.Module, names: list[str] | None) -> list[str]:
    if not names:
        return []
    found = []
    for name in names:
        matched = matching_paths(model, name)
        if not matched:
            raise TunelabError(f"LoRA modules_to_save name {name!r} matches no module in {type(model).__name__}")
        found += [p for p in matched if p not in found]
    return found


def _check_disjoint(targets: list[str], to_save: list[str]) -> None:
    for saved in to_save:
        inside = [t for t in targets if t.startswith(saved + ".")]
        if inside:
            raise ConfigError(
                f"LoRA module to save {saved} contains LoRA targets ({', '.join(inside[:3])}); "
                "train it in full or give it an adapter, not both"
            )


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit linear (experts module) counts its logical weights."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features for m in model.modules() if is_quantized_linear(m))
    total += sum(m.numel() for m in model.modules() if isinstance(m, Experts4bit))
    return trainable, total


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(path, layer) for every LoRALinear in the model."""
    return ((p, m) for p, m in model.named_modules() if isinstance(m, LoRALinear))


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Inside the block the model computes its base output: adapters off, original modules_to_save used."""
    layers = [m for m in model.modules() if isinstance(m, (LoRALinear, LoRAExperts, ModuleToSave))]
    if any(getattr(m, "merged", False) for m in layers):
        raise TunelabError("cannot disable adapters that are merged into the weights; unmerge_adapter(model) first")
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, was in zip(layers, before):
            m.enabled = was


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold every adapter into its float base weight, keeping the LoRA layers (undo: unmerge_adapter)."""
    for layer in model.modules():
        if isinstance(layer, (LoRALinear, LoRAExperts)):
            layer.merge()
    return model


def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Subtract the adapters merged by merge_adapter, restoring the base weights (to fp rounding)."""
    for layer in model.modules():
        if isinstance(layer, (LoRALinear, LoRAExperts)):
            layer.unmerge()
    return model


def merge_lora(model: nn.Module, base_weights: dict[str, torch.Tensor] | None = None,
               from_quantized: bool = False) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding the merged weight; returns the model (in place).

    Over nn.Linear: W + scale * B @ A (DoRA: m / ||W + dW|| * (W + dW)). Over a 4-bit base the merge goes
    into the original full-precision weights, `base_weights` (a state dict keyed by module path +
    ".weight"/".bias", e.g. the model's state_dict() before quantize_model); merging into the de-quantized
    4-bit weights keeps every weight's 4-bit rounding error, so it needs from_quantized=True and warns.
    (Measured in docs/export.md: kept in fp32, the de-quantized merge reproduces the trained 4-bit model
    exactly, while the merge into the original weights differs from it by the base's rounding error.) Every other 4-bit linear is
    turned back into nn.Linear the same way, and modules_to_save keep their trained copy: the result is
    a model of plain linears. Experts the same way (tunelab.lora.experts.merge_experts): 4-bit experts come back
    from base_weights["<experts path>.<weight name>"] (or de-quantized), and each gets W_e + scale * B_e @ A_e.
    """
    # The paths whose weight is 4-bit: a LoRALinear over a 4-bit base (not its .base again), or a bare one.
    wrapped = {p + ".base" for p, _ in lora_layers(model)}
    quantized = [p for p, m in model.named_modules() if p not in wrapped and is_quantized_linear(
        m.base if isinstance(m, LoRALinear) else m)]
    experts = [p.removesuffix(".base") for p, m in model.named_modules() if isinstance(m, Experts4bit)]
    if (quantized or experts) and base_weights is None:
        if not from_quantized:
            raise TunelabError(
                f"{len(quantized + experts)} layers (e.g. {(quantized + experts)[0]}) are 4-bit: pass base_weights=<the original "
                "full-precision state dict> to merge into them, or from_quantized=True to merge into the "
                "de-quantized 4-bit weights (loses quality)"
            )
        warnings.warn(
            f"merging LoRA into de-quantized 4-bit weights ({len(quantized + experts)} layers): the merged model keeps "
            "every weight's 4-bit rounding error; pass base_weights=<original state dict> to avoid it",
            stacklevel=2,
        )
    for path in quantized:  # the linears; experts are merge_experts' below
        module = model.get_submodule(path)
        if isinstance(module, LoRALinear):
            module.base = _float_linear(path, module.base, base_weights)
        else:
            model.set_submodule(path, _float_linear(path, module, base_weights))
    for path, layer in list(lora_layers(model)):
        if layer.merged:
            layer.unmerge()
        linear = layer.base
        linear.weight.data = layer.merged_weight(linear.weight.data)
        model.set_submodule(path, linear)
    merge_experts(model, base_weights)  # experts (keys "<path>.<name>" in base_weights): plain, float, merged
    for path, m in list(model.named_modules()):
        if isinstance(m, ModuleToSave):
            m.original = m.trained  # remove_lora then keeps the trained copy
    return remove_lora(model)


def _float_linear(path: str, quantized: nn.Module, base_weights: dict[str, torch.Tensor] | None) -> nn.Linear:
    """nn.Linear for a 4-bit linear at `path`: from base_weights when given, else de-quantized."""
    shape = (quantized.out_features, quantized.in_features)
    if base_weights is None:
        weight, bias = base_weight(quantized), quantized.bias
    else:
        if path + ".weight" not in base_weights:
            raise TunelabError(f"base_weights has no '{path}.weight' for the 4-bit layer {path}")
        weight, bias = base_weights[path + ".weight"], base_weights.get(path + ".bias", quantized.bias)
        if tuple(weight.shape) != shape:
            raise TunelabError(
                f"base_weights['{path}.weight'] has shape {tuple(weight.shape)} but the 4-bit layer {path} "
                f"is {shape} (out, in): these base weights are from a different model"
            )
    linear = nn.Linear(shape[1], shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear.requires_grad_(False)


def remove_lora(model: nn.Module) -> nn.Module:
    """Drop the adapters without merging: each LoRALinear gives back its base, each module to save its
    original, in place (PEFT's unload). requires_grad flags stay as apply_lora left them (frozen)."""
    for path, m in list(model.named_modules()):
        if isinstance(m, (LoRALinear, LoRAExperts)):
            model.set_submodule(path, m.base)
        elif isinstance(m, ModuleToSave):
            model.set_submodule(path, m.original)
    for attr in ("lora_config", "lora_counts"):
        model.__dict__.pop(attr, None)
    return model


def lora_param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0,
                      loraplus_ratio: float | None = None) -> list[dict]:
    """Parameter groups for torch.optim.AdamW over the trainable parameters.

    LoRA+ as PEFT's create_loraplus_optimizer: lora_B weights and 1-D parameters (DoRA magnitudes, biases
    of modules_to_save) get lr * loraplus_ratio; everything else lr. 1-D parameters get no weight decay.
    """
    ratio = 1.0 if loraplus_ratio is None else loraplus_ratio
    groups = {"A": [], "B": [], "no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1:
            groups["no_decay"].append(p)
        elif ".lora_B." in name:
            groups["B"].append(p)
        else:
            groups["A"].append(p)
    settings = {"A": (lr, weight_decay), "B": (lr * ratio, weight_decay), "no_decay": (lr * ratio, 0.0)}
    return [{"params": ps, "lr": settings[k][0], "weight_decay": settings[k][1], "name": k}
            for k, ps in groups.items() if ps]

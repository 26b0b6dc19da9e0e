"""LoRA / QLoRA adapters: LoRALinear over nn.Linear or a 4-bit linear, PEFT-format save and load.

    cfg = LoraConfig(r=8, alpha=16, target_modules="all-linear")
    model = apply_lora(model, cfg)          # wraps targets, freezes the rest, prints trainable counts
    opt = torch.optim.AdamW(lora_param_groups(model, lr=2e-4, loraplus_ratio=16))
    save_adapter(model, "out/adapter")      # PEFT layout: PeftModel.from_pretrained reads it
    merged = merge_lora(model)              # plain nn.Linear layers with W + scale * B @ A
"""

from tunelab.lora.config import LoraConfig
from tunelab.lora.layer import LoRALinear, ModuleToSave
from tunelab.lora.model import (
    apply_lora,
    count_parameters,
    disable_adapters,
    find_targets,
    lora_layers,
    lora_param_groups,
    merge_adapter,
    merge_lora,
    remove_lora,
    unmerge_adapter,
)
from tunelab.lora.peft_format import adapter_state_dict, load_adapter, read_adapter_config, save_adapter

__all__ = [
    "LoraConfig", "LoRALinear", "ModuleToSave", "apply_lora", "count_parameters", "disable_adapters",
    "find_targets", "lora_layers", "lora_param_groups", "merge_adapter", "merge_lora", "remove_lora",
    "unmerge_adapter",
    "adapter_state_dict", "load_adapter", "read_adapter_config", "save_adapter",
]

"""LoraConfig: what an adapter looks like (rank, scale, targets), validated when it is built."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from tunelab.errors import ConfigError

INITS = ("kaiming", "gaussian")


@dataclass
class LoraConfig:
    """The adapter's shape and where it goes; the same fields PEFT writes to adapter_config.json."""

    r: int
    """Rank of the update B @ A: A is (r, in_features), B is (out_features, r). Must be > 0."""
    alpha: float
    """Numerator of the scale: the update is multiplied by alpha / r (alpha / sqrt(r) with use_rslora). > 0."""
    dropout: float = 0.0
    """Dropout on the adapter's input only (not on the base path); 0 <= dropout < 1. 0 skips it entirely."""
    target_modules: str | list[str] = "all-linear"
    """Which linears get an adapter: a list of names (a name matches a module path equal to it or ending
    in "." + name, e.g. "q_proj"), a regex string (full match on the module path, as in PEFT), or
    "all-linear" (every nn.Linear / 4-bit linear except the output head)."""
    use_rslora: bool = False
    """Rank-stabilized LoRA (Kalajdzievski 2023): scale alpha / sqrt(r) instead of alpha / r."""
    use_dora: bool = False
    """DoRA (Liu et al. 2024): a learned per-output-row magnitude times the direction of W + scale * B @ A."""
    modules_to_save: list[str] | None = None
    """Modules trained in full beside the adapter (e.g. a classification head), matched like name lists."""
    init: str = "kaiming"
    """Init of A: "kaiming" (Kaiming-uniform, a=sqrt(5), as nn.Linear) or "gaussian" (normal, std 1 / r).
    B always starts at zero, so a fresh adapter leaves the model's output unchanged."""
    bias: str = "none"
    """Which biases train; only "none" is supported (the base biases stay frozen)."""
    loraplus_ratio: float | None = None
    """LoRA+ (Hayou et al. 2024): B's learning rate is lr * ratio (PEFT suggests 16); None trains both at lr."""
    target_experts: bool | list[str] = False
    """Mixture-of-experts models: also adapt the 3-D expert weights (transformers 5's `mlp.experts.gate_up_proj`,
    `mlp.experts.down_proj`), one rank-r update per expert, saved as PEFT's `target_parameters`. True: every
    expert weight; a list: names matched like target_modules names ("down_proj", "mlp.experts.gate_up_proj").
    False (default, as PEFT's all-linear): the experts stay frozen. Needs dropout 0 and no DoRA (as PEFT)."""
    task_type: str | None = None
    """PEFT task type written to adapter_config.json ("CAUSAL_LM", ...); None infers it from the model class."""

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"lora r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ConfigError(f"lora alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ConfigError(f"lora init must be one of {INITS}, got {self.init!r}")
        if self.bias != "none":
            raise ConfigError(f"lora bias={self.bias!r} is not supported; use 'none' (base biases stay frozen)")
        if self.loraplus_ratio is not None and not self.loraplus_ratio > 0:
            raise ConfigError(f"lora loraplus_ratio must be > 0 or None, got {self.loraplus_ratio!r}")
        if not isinstance(self.target_modules, str):
            self.target_modules = _name_list(self.target_modules, "target_modules")
        elif self.target_modules != "all-linear":
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise ConfigError(f"lora target_modules {self.target_modules!r} is not a valid regex: {e}") from None
        if not isinstance(self.target_experts, bool):
            self.target_experts = _name_list(self.target_experts, "target_experts")
        check_experts(self.target_experts, self.dropout, self.use_dora)
        if self.modules_to_save is not None:
            self.modules_to_save = _name_list(self.modules_to_save, "modules_to_save")

    @property
    def scale(self) -> float:
        """The factor on B @ A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def check_experts(target_experts, dropout: float, use_dora: bool) -> None:
    """The combinations with target_experts that neither tunelab nor PEFT's target_parameters supports."""
    if target_experts and dropout:
        raise ConfigError(f"lora dropout={dropout} with target_experts: an expert update is added to the weights "
                          "(W + scale * B @ A), so there is no adapter input to drop out (PEFT refuses it too); "
                          "set lora dropout to 0 or target_experts to false")
    if target_experts and use_dora:
        raise ConfigError("lora use_dora with target_experts is not supported (nor by PEFT's target_parameters); "
                          "set one of them to false")


def _name_list(names, field: str) -> list[str]:
    names = list(names)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"lora {field} must be a non-empty list of module names, got {names!r}")
    return names

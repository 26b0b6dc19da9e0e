"""LoRA on mixture-of-experts weights: one low-rank update per expert, in PEFT 0.21's `target_parameters` layout.

A MoE experts module of transformers 5 holds 3-D weights W (E experts, out, in) (quant/experts.py). PEFT's
ParamWrapper (peft/tuners/lora/layer.py) adapts such a parameter with one pair of matrices for all experts:
  lora_A.weight  (E * r, in)   rows e*r .. e*r + r - 1 are expert e's A_e (r, in)
  lora_B.weight  (out, r * E)  column k*E + e is column k of expert e's B_e (out, r): experts interleaved
and the expert weights become W_e + scale * B_e @ A_e (scale = alpha / r, or alpha / sqrt(r) with rsLoRA);
an `is_transposed` module stores (E, in, out) and gets the transpose. LoRAExperts keeps exactly these two
matrices per adapted parameter, so saving is renaming (peft_format.py) and PEFT loads the file unchanged.
Its forward runs the experts module's own forward over the updated weights (quant.experts.run_experts), so the
routing, the activation and the expert products stay transformers' code.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tunelab.errors import ConfigError, TunelabError
from tunelab.quant.experts import Experts4bit, expert_modules, expert_weight_names, run_experts
from tunelab.quant.linear import _matmul_dtype


class ExpertLoRA(nn.Module):
    """The update of one 3-D expert weight: lora_A (E*r, in), lora_B (out, r*E), PEFT's layout (module doc)."""

    def __init__(self, shape: torch.Size, transposed: bool, r: int, scale: float, init: str,
                 device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.num_experts, self.r, self.scale, self.transposed = shape[0], r, scale, transposed
        in_f, out_f = (shape[1], shape[2]) if transposed else (shape[2], shape[1])
        # nn.Linear only holds the matrices (never called), so names and init are PEFT's: lora_A.weight, ...
        self.lora_A = nn.Linear(in_f, r * self.num_experts, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r * self.num_experts, out_f, bias=False, device=device, dtype=dtype)
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta(self) -> torch.Tensor:
        """scale * B_e @ A_e for every expert: (E, out, in), or (E, in, out) for a transposed weight."""
        e, r = self.num_experts, self.r
        a = self.lora_A.weight.view(e, r, -1)  # (E, r, in)
        b = self.lora_B.weight.view(-1, r, e).permute(2, 0, 1)  # (out, r, E) -> (E, out, r)
        d = torch.bmm(b, a) * self.scale  # (E, out, in)
        return d.transpose(1, 2) if self.transposed else d


class LoRAExperts(nn.Module):
    """A frozen experts module (float, or 4-bit Experts4bit) plus a per-expert LoRA update of some of its weights.

    adapters: {parameter name: ExpertLoRA}, in the module's registration order (PEFT nests its wrappers in that
    order, which fixes the saved key names). forward: the module's own forward over W + delta.
    """

    def __init__(self, base: nn.Module, names: list[str], r: int, alpha: float, use_rslora: bool = False,
                 init: str = "kaiming"):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.r, self.alpha = r, alpha
        self.scale = alpha / (math.sqrt(r) if use_rslora else r)
        transposed = bool(getattr(self.module, "is_transposed", False))
        self.adapters = nn.ModuleDict()
        for name in expert_weight_names(base):
            if name in names:
                w = self._stored(name)
                # fp32 adapters over a 4-bit or half-precision base (as LoRALinear)
                dtype = w.dtype if w.dtype not in (torch.float16, torch.bfloat16) else torch.float32
                self.adapters[name] = ExpertLoRA(w.shape, transposed, r, self.scale, init, w.device, dtype)
        self.enabled = True
        self.merged = False

    @property
    def module(self) -> nn.Module:
        """The transformers experts module whose forward runs."""
        return self.base.base if isinstance(self.base, Experts4bit) else self.base

    def _stored(self, name: str):
        return self.base.qweights[name] if isinstance(self.base, Experts4bit) else getattr(self.base, name)

    def weights(self, dtype: torch.dtype | None = None, adapted: bool = True) -> dict[str, torch.Tensor]:
        """The expert weights the forward uses: the base's (de-quantized for a 4-bit base) + each update."""
        if isinstance(self.base, Experts4bit):
            w = self.base.dequantize_weights(dtype)
        else:
            w = {name: getattr(self.base, name) for name in self.adapters}
        if adapted and self.enabled and not self.merged:
            for name, adapter in self.adapters.items():
                w[name] = w[name] + adapter.delta().to(w[name].dtype)
        return w

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if isinstance(self.base, Experts4bit):
            dtype = self.base.compute_dtype or _matmul_dtype(hidden_states)
        elif not self.enabled or self.merged:
            return self.base(hidden_states, *args, **kwargs)
        else:
            dtype = None
        return run_experts(self.module, lambda: self.weights(dtype), hidden_states, *args, **kwargs)

    def merge(self) -> None:
        """Fold the updates into the float base weights in place (undo: unmerge)."""
        self._add(+1, "merge")

    def unmerge(self) -> None:
        self._add(-1, "unmerge")

    def _add(self, sign: int, what: str) -> None:
        if isinstance(self.base, Experts4bit):
            raise TunelabError(f"cannot {what} expert LoRA in place over 4-bit experts; use tunelab.lora.merge_lora")
        if self.merged == (sign > 0):
            return
        with torch.no_grad():
            for name, adapter in self.adapters.items():
                w = getattr(self.base, name)
                w.add_(adapter.delta().to(w.dtype), alpha=sign)
        self.merged = sign > 0

    def extra_repr(self) -> str:
        return f"{', '.join(self.adapters)}: r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}"


def find_expert_targets(model: nn.Module, target_experts) -> list[tuple[str, list[str]]]:
    """(experts module path, [weight names]) that `target_experts` selects (True: every expert weight; a list:
    names matched like target_modules names against "<module path>.<weight name>"). A request that matches
    nothing is a ConfigError."""
    from tunelab.lora.model import name_matches

    if not target_experts:
        return []
    found = []
    for path, module in expert_modules(model):
        names = [n for n in expert_weight_names(module)
                 if target_experts is True or any(name_matches(f"{path}.{n}", t) for t in target_experts)]
        if names:
            found.append((path, names))
    if not found:
        have = sorted({n for _, m in expert_modules(model) for n in expert_weight_names(m)})
        raise ConfigError(
            f"lora.target_experts={target_experts!r} matches no expert weight of {type(model).__name__}"
            + (f" (its experts have {have})" if have else " (it has no mixture-of-experts weights)")
            + "; set lora.target_experts=false or name existing ones")
    return found


def apply_expert_lora(model: nn.Module, cfg) -> None:
    """Wrap the experts modules cfg.target_experts selects in LoRAExperts, in place."""
    for path, names in find_expert_targets(model, cfg.target_experts):
        model.set_submodule(path, LoRAExperts(model.get_submodule(path), names, cfg.r, cfg.alpha, cfg.use_rslora,
                                              cfg.init))


def quantized_expert_paths(model: nn.Module) -> list[str]:
    """Paths of the 4-bit experts modules (as the plain model names them)."""
    return [p.removesuffix(".base") for p, m in model.named_modules() if isinstance(m, Experts4bit)]


def merge_experts(model: nn.Module, base_weights: dict[str, torch.Tensor] | None) -> None:
    """Replace every LoRAExperts and Experts4bit by the plain experts module holding float weights (merged with
    the update), in place. 4-bit weights come from `base_weights` (keyed "<experts path>.<name>") when given,
    else de-quantized."""
    for path, m in list(model.named_modules()):
        if not isinstance(m, (LoRAExperts, Experts4bit)) or path.endswith(".base"):
            continue  # an Experts4bit under a LoRAExperts is handled with it
        lora = m if isinstance(m, LoRAExperts) else None
        base = m.base if lora is not None else m
        if lora is not None and lora.merged:
            lora.unmerge()
        if isinstance(base, Experts4bit):
            weights = base.dequantize_weights()
            for name in weights:
                key = f"{path}.{name}"
                if base_weights is not None:
                    if key not in base_weights:
                        raise TunelabError(f"base_weights has no '{key}' for the 4-bit experts {path}")
                    if tuple(base_weights[key].shape) != tuple(weights[name].shape):
                        raise TunelabError(f"base_weights['{key}'] has shape {tuple(base_weights[key].shape)} but the "
                                           f"4-bit experts hold {tuple(weights[name].shape)}: another model's weights")
                    weights[name] = base_weights[key].to(weights[name].device)
            module = base.base
        else:
            weights = {name: getattr(base, name).detach() for name in expert_weight_names(base)}
            module = base
        with torch.no_grad():
            for name, w in weights.items():
                if lora is not None and name in lora.adapters:  # summed in fp32, rounded once (as LoRALinear)
                    w = (w.float() + lora.adapters[name].delta().float().to(w.device)).to(w.dtype)
                module._parameters[name] = nn.Parameter(w.clone(), requires_grad=False)
        model.set_submodule(path, module)

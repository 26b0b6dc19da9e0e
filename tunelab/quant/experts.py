"""Mixture-of-experts weights in 4 bits: the 3-D expert parameters of transformers 5 MoE blocks.

In transformers 5 the experts of a MoE block are one module (MixtralExperts, Qwen3MoeExperts, ...) holding
3-D parameters, `gate_up_proj` (experts, 2 * intermediate, hidden) and `down_proj` (experts, hidden,
intermediate): one (out, in) matrix per expert, or (in, out) where the module says `is_transposed`.
`Experts4bit` stores each of them as blockwise codes (`quantize`, e.g. NF4 at block 64, with blocks that never
straddle two experts) and runs the module's own forward over the weights de-quantized for that call
(`run_experts`), so no expert computation is written twice.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from tunelab.quant.linear import _matmul_dtype, is_skipped
from tunelab.quant.tensor import QuantError, QuantizedTensor, quantize


def expert_weight_names(module: nn.Module) -> list[str]:
    """The 3-D expert parameters of a MoE experts module, in registration order; [] for any other module.

    An experts module is one with `num_experts` whose own 3-D parameters have that many rows (a Conv1d weight,
    also 3-D, is not one)."""
    if isinstance(module, Experts4bit):
        return list(module.qweights)
    n = getattr(module, "num_experts", None)
    if not isinstance(n, int):
        return []
    return [name for name, p in module.named_parameters(recurse=False) if p.ndim == 3 and p.shape[0] == n]


def expert_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every experts module (float or 4-bit) in the model, in model order."""
    return [(path, m) for path, m in model.named_modules() if expert_weight_names(m)]


def run_experts(module: nn.Module, weights: Callable[[], dict[str, torch.Tensor]], *args, **kwargs):
    """`module(*args, **kwargs)` with its expert parameters replaced by `weights()` for this call only.

    The replacement (torch.func.functional_call) touches this instance alone, for the call. With gradients on,
    the call is checkpointed: `weights()` (de-quantized experts, W + LoRA update) is computed again in backward
    instead of being kept by autograd between forward and backward: every layer's experts, whole, in float,
    would otherwise live until backward, which is what 4 bits are meant to avoid.
    """
    def call(*a):
        return functional_call(module, weights(), a, kwargs)

    if torch.is_grad_enabled():
        return checkpoint(call, *args, use_reentrant=False)
    return call(*args)


class Experts4bit(nn.Module):
    """A frozen MoE experts module whose 3-D weights are stored in 4 bits, de-quantized in each forward.

    `base` is the transformers experts module with its 3-D parameters removed (its other state, e.g. the
    activation, stays); `qweights` maps each removed parameter's name to its QuantizedTensor of the same
    (experts, ., .) shape. forward(*args) is base's own forward over the de-quantized weights.
    """

    def __init__(self, base: nn.Module, qweights: dict[str, QuantizedTensor], compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.qweights = qweights
        self.compute_dtype = compute_dtype
        self.num_experts = base.num_experts

    @classmethod
    def from_experts(cls, experts: nn.Module, quant_type: str = "nf4", block_size: int = 64, double_quant: bool = True,
                     compute_dtype: torch.dtype | None = None, path: str = "experts") -> "Experts4bit":
        """Quantize every expert weight of `experts` (removed from it as it goes) into a new Experts4bit."""
        if quant_type not in ("nf4", "fp4", "int4"):
            raise QuantError(f"Experts4bit stores 4-bit weights (nf4, fp4, int4), not {quant_type!r}")
        qweights = {}
        for name in expert_weight_names(experts):
            w = experts._parameters.pop(name).detach()  # (E, out, in); the float copy goes with this frame
            per_expert = w[0].numel()
            if per_expert % block_size:
                raise QuantError(
                    f"{path}.{name}: one expert's weight has {per_expert} values, not a multiple of the block size "
                    f"{block_size}, so a block would hold two experts; set quant.block_size to a power of two "
                    f"dividing {per_expert}")
            # Flat row-major blocks: with per_expert % block_size == 0 each block lies inside one expert, so this
            # is quantize(w[e]) for every e (the double-quantized scales are grouped across experts).
            qweights[name] = quantize(w, quant_type, block_size=block_size, double_quant=double_quant)
        return cls(experts, qweights, compute_dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed expert weights and their quantization state."""
        return sum(q.nbytes for q in self.qweights.values())

    def numel(self) -> int:
        """Logical number of expert weights (what the float parameters held)."""
        return sum(q.numel() for q in self.qweights.values())

    def dequantize_weights(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """{name: (experts, ., .) tensor in `dtype`} (default: each weight's original dtype), fresh tensors."""
        return {name: q.dequantize(dtype) for name, q in self.qweights.items()}

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        dtype = self.compute_dtype or _matmul_dtype(hidden_states)
        return run_experts(self.base, lambda: self.dequantize_weights(dtype), hidden_states, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        # Device moves only (as Linear4bit): fn on the packed codes tells where the module is going.
        super()._apply(fn, recurse)
        for name, q in self.qweights.items():
            self.qweights[name] = q.to(fn(q.data).device)
        return self

    def extra_repr(self) -> str:
        q = next(iter(self.qweights.values()))
        return f"{', '.join(self.qweights)}: {q.quant_type}{'+dq' if q.double_quant else ''}, block_size={q.block_size}"


def quantize_experts(model: nn.Module, quant_type: str = "nf4", block_size: int = 64, double_quant: bool = True,
                     skip: tuple[str, ...] = (), compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every float MoE experts module (except paths matching `skip`) by a frozen Experts4bit, in place."""
    for path, module in expert_modules(model):
        if not isinstance(module, Experts4bit) and not is_skipped(path, tuple(skip)):
            model.set_submodule(path, Experts4bit.from_experts(module, quant_type, block_size, double_quant, compute_dtype,
                                                               path))
    return model

"""LoRALinear: a frozen linear plus a low-rank update; ModuleToSave: a module trained in full beside it.

Numerics follow PEFT 0.21 (peft/tuners/lora/layer.py, dora.py) so adapters move between the two unchanged.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.errors import TunelabError
from tunelab.quant import Linear4bit


def is_quantized_linear(module: nn.Module) -> bool:
    """A frozen 4-bit linear: no float weight, only dequantize_weight()."""
    return isinstance(module, Linear4bit)


def is_linear(module: nn.Module) -> bool:
    """A layer LoRA can wrap: nn.Linear or a frozen 4-bit linear."""
    return isinstance(module, nn.Linear) or is_quantized_linear(module)


def base_weight(base: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The base layer's (out, in) weight: the float weight itself, or the de-quantized 4-bit one."""
    if isinstance(base, nn.Linear):
        return base.weight if dtype is None else base.weight.to(dtype)
    return base.dequantize_weight(dtype=dtype)


class LoRALinear(nn.Module):
    """y = base(x) + scale * B(A(dropout(x))), with base frozen; DoRA rescales each output row.

    A is (r, in), Kaiming-uniform (or Gaussian) at init; B is (out, r), zero at init, so a fresh adapter is
    the identity on the model's output. Parameter names match PEFT's saved keys: lora_A.weight,
    lora_B.weight, lora_magnitude_vector.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, use_dora: bool = False, init: str = "kaiming"):
        super().__init__()
        if not is_linear(base):
            raise TunelabError(f"LoRALinear wraps nn.Linear or a 4-bit linear, got {type(base).__name__}")
        if r <= 0:
            raise TunelabError(f"LoRA rank r must be > 0, got {r}")
        self.base = base.requires_grad_(False)
        self.r, self.alpha = r, alpha
        self.scale = alpha / (math.sqrt(r) if use_rslora else r)
        # No module at all for p=0: the forward then has exactly one extra path, A then B.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        # Adapters over a 4-bit or half-precision base train in fp32, as QLoRA and PEFT (autocast_adapter_dtype)
        # do: AdamW's small updates would round away in bf16. Under autocast their matmuls still run in bf16.
        device = base.weight.device  # Linear4bit.weight: the packed codes, on the layer's device
        half = (torch.float16, torch.bfloat16)
        dtype = base.weight.dtype if isinstance(base, nn.Linear) and base.weight.dtype not in half else torch.float32
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=device, dtype=dtype)
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / r)  # PEFT's init_lora_weights="gaussian"
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's default, as loralib
        nn.init.zeros_(self.lora_B.weight)
        self.use_dora = use_dora
        if use_dora:
            # m starts as the row norms of W (B = 0), so W' = m * W / ||W|| = W at init.
            with torch.no_grad():
                norm = self._row_norm(base_weight(base, dtype))
            self.lora_magnitude_vector = nn.Parameter(norm)  # (out,)
        # A faster forward with the same result up to rounding, set on this instance by tunelab.accel
        # (train.kernels): kernel(layer, x) -> output, or None where it does not apply. None: the forward below.
        self.kernel = None
        self.enabled = True  # False: the layer is exactly its base (see disable_adapters)
        self.merged = False  # True: the update is folded into base.weight (see merge / unmerge)
        self._merge_factor = None  # DoRA's m / ||W + dW|| at merge time, to unmerge exactly

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and self.enabled and not self.merged:
            out = self.kernel(self, x)
            if out is not None:
                return out
        result = self.base(x)
        if not self.enabled or self.merged:
            return result
        h = x if self.dropout is None else self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):  # under autocast, cast to fp32 only to be cast back
            h = h.to(self.lora_A.weight.dtype)
        lora = self.lora_B(self.lora_A(h))  # (..., out): fp32 over a half-precision base, unless autocast
        if not self.use_dora:
            return (result + lora * self.scale).to(result.dtype)  # summed in the wider dtype, as PEFT
        return result + self._dora_extra(h, result, lora.to(result.dtype))

    def _dora_extra(self, h, result, lora):
        """DoRA's output minus the base output: (g - 1) * W h + g * scale * B A h, g = m / ||W + scale B A||.

        The norm is a constant for backprop (DoRA paper sec. 4.3, as PEFT). Without active dropout W h is
        the base output less its bias, so no second matmul with W.
        """
        weight = base_weight(self.base, result.dtype)
        with torch.no_grad():
            norm = self._row_norm(weight + self.delta_weight().to(weight.dtype))
        g = self.lora_magnitude_vector / norm  # (out,)
        if self.dropout is None or not self.training:
            bias = self.base.bias
            base_out = result if bias is None else result - bias
        else:
            base_out = F.linear(h.to(weight.dtype), weight)
        # m is fp32 over a 4-bit base: come back to the base output's dtype, as PEFT does.
        return ((g - 1) * base_out + g * lora * self.scale).to(result.dtype)

    @staticmethod
    def _row_norm(weight: torch.Tensor) -> torch.Tensor:
        return torch.linalg.norm(weight, dim=1).to(weight.dtype)  # (out,)

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A, shape (out, in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scale

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The (out, in) weight that gives this layer's output without the adapter, for a base weight `weight`.

        LoRA: W + scale * B @ A. DoRA: m / ||W + dW|| * (W + dW), the norm taken row-wise.
        """
        with torch.no_grad():  # summed in fp32, rounded once to the weight's dtype (a bf16 merge stays exact-ish)
            w, delta = weight.float(), self.delta_weight().to(weight.device, torch.float32)
            merged = self._dora_factor(w, delta) * (w + delta) if self.use_dora else w + delta
            return merged.to(weight.dtype)

    def _dora_factor(self, weight, delta):
        return (self.lora_magnitude_vector.to(weight.device) / self._row_norm(weight + delta)).to(weight.dtype).view(-1, 1)

    def merge(self) -> None:
        """Fold the update into base.weight in place (reversible with unmerge); forward then skips A and B."""
        if self.merged:
            return
        weight = self._float_base_weight("merge")
        with torch.no_grad():
            delta = self.delta_weight().to(weight.dtype)
            if self.use_dora:
                self._merge_factor = self._dora_factor(weight, delta)
                weight.copy_(self._merge_factor * (weight + delta))
            else:
                weight.add_(delta)
        self.merged = True

    def unmerge(self) -> None:
        """Undo merge: subtract the update (DoRA: divide by the factor used at merge, then subtract)."""
        if not self.merged:
            return
        weight = self._float_base_weight("unmerge")
        with torch.no_grad():
            delta = self.delta_weight().to(weight.dtype)
            if self.use_dora:
                weight.div_(self._merge_factor).sub_(delta)
                self._merge_factor = None
            else:
                weight.sub_(delta)
        self.merged = False

    def _float_base_weight(self, what: str) -> torch.Tensor:
        if not isinstance(self.base, nn.Linear):
            raise TunelabError(
                f"cannot {what} a LoRA adapter in place over a 4-bit base ({type(self.base).__name__}); "
                "use tunelab.lora.merge_lora(model, base_weights=...) to merge into the full-precision weights"
            )
        return self.base.weight.data

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}, dora={self.use_dora}"


class ModuleToSave(nn.Module):
    """A module trained in full (e.g. a classification head): the original stays frozen, a copy trains.

    Keeping the original lets a disabled adapter give exactly the base model's output.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original.requires_grad_(False)
        self.trained = copy.deepcopy(original).requires_grad_(True)
        self.enabled = True

    def forward(self, *args, **kwargs):
        return (self.trained if self.enabled else self.original)(*args, **kwargs)

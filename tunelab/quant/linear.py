"""A frozen 4-bit linear layer (QLoRA's base layer) and `quantize_model`, which swaps them in.

The layer keeps only the packed weight. Its autograd function dequantizes W in forward, computes
x @ W^T + b, and lets W go; backward dequantizes W again to give the input gradient grad @ W. So no
full-precision copy of the weight lives between forward and backward, and W gets no gradient (frozen).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.quant.tensor import QuantError, QuantizedTensor, quantize


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear will compute in: autocast's (bf16 on CUDA) when it is on, else x's.

    Dequantizing straight to it spares autocast a cast of the whole weight.
    """
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _DequantLinear(torch.autograd.Function):
    """y = x @ dequant(W)^T + b; keeps the layer (its packed weight), never the dequantized W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, layer: "Linear4bit"):
        dtype = layer.compute_dtype or _matmul_dtype(x)
        ctx.layer, ctx.dtype, ctx.has_bias = layer, dtype, bias is not None
        w = layer.matmul_weight(dtype)  # (out, in)
        return F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = ctx.layer.matmul_weight(ctx.dtype)  # recomputed
            grad_x = grad_out.to(ctx.dtype) @ w  # (..., out) @ (out, in) -> (..., in)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None


class Linear4bit(nn.Module):
    """A frozen linear layer whose weight is stored blockwise in 4 bits (nf4 / fp4).

    state_dict() uses bitsandbytes' Linear4bit keys (weight, weight.absmax, weight.quant_map,
    [weight.nested_absmax, weight.nested_quant_map,] weight.quant_state.bitsandbytes__nf4, bias), and
    load_state_dict() reads them, so checkpoints move both ways.
    """

    def __init__(self, qweight: QuantizedTensor, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        if len(qweight.shape) != 2:
            raise QuantError(f"Linear4bit needs a 2-D (out, in) weight, got shape {tuple(qweight.shape)}")
        self.qweight = qweight
        self.out_features, self.in_features = qweight.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.compute_dtype = compute_dtype
        # A faster dequantize for this layer's matmuls, set on this instance by tunelab.accel (train.kernels):
        # dequant(qweight, dtype) -> the (out, in) weight, the same numbers. None: QuantizedTensor.dequantize.
        self.dequant = None
        # FSDP (tunelab.train.fsdp) may keep only this process's blocks of the packed weight in `qweight`
        # (qweight.shard set) and set `gather`: the shard -> the whole QuantizedTensor (collective: every
        # process calls it, in the same order). None: qweight is whole.
        self.gather = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", block_size: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> "Linear4bit":
        """Quantize an nn.Linear's weight (on its device) into a new frozen Linear4bit."""
        if quant_type not in ("nf4", "fp4", "int4"):
            raise QuantError(f"Linear4bit stores 4-bit weights (nf4, fp4, int4), not {quant_type!r}")
        qweight = quantize(linear.weight.detach(), quant_type, block_size=block_size, double_quant=double_quant)
        return cls(qweight, linear.bias, compute_dtype)

    # ---- facts ---------------------------------------------------------------------------------
    @property
    def quant_type(self) -> str:
        return self.qweight.quant_type

    @property
    def block_size(self) -> int:
        return self.qweight.block_size

    @property
    def weight(self) -> torch.Tensor:
        """The packed uint8 codes (bitsandbytes' `weight` tensor): tells device, not meant for math."""
        return self.qweight.data

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight and its quantization state (bias not included)."""
        return self.qweight.nbytes

    def extra_repr(self) -> str:
        dq = "+dq" if self.qweight.double_quant else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.quant_type}{dq}, block_size={self.block_size}")

    # ---- math ----------------------------------------------------------------------------------
    def whole_qweight(self) -> QuantizedTensor:
        """The whole packed weight: qweight, or under FSDP its blocks gathered from every process (collective;
        use it at once and let it go, so that only the shard stays between uses)."""
        return self.qweight if self.gather is None else self.gather(self.qweight)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight (out, in) in `dtype` (default: the original weight's dtype)."""
        return self.whole_qweight().dequantize(dtype)

    def matmul_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight (out, in) in `dtype` for one matmul of forward or backward. Through `dequant` it may
        live in a buffer the next layer's matmul reuses: use it at once, keep dequantize_weight's."""
        qweight = self.whole_qweight()  # under FSDP: gathered for this matmul, freed when it returns
        if self.dequant is None:
            return qweight.dequantize(dtype)
        return self.dequant(qweight, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DequantLinear.apply(x, self.bias, self)

    # ---- moving and saving ---------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        # Device moves only: .half()/.float() must not touch the fp32 scales. The packed uint8 codes are
        # unaffected by float casts, so applying fn to them tells where the module is going.
        super()._apply(fn, recurse)
        self.qweight = self.qweight.to(fn(self.qweight.data).device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        sd = self.whole_qweight().to_bnb_state_dict(prefix)
        destination[prefix + "weight"] = sd.pop(prefix + "weight")
        super()._save_to_state_dict(destination, prefix, keep_vars)  # bias, after weight as in bitsandbytes
        destination.update(sd)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        ours = {k: state_dict[k] for k in state_dict if k == key or k.startswith(key + ".")}
        if key in ours and self.gather is not None:
            error_msgs.append(f"{key}: this layer's 4-bit weight is sharded by FSDP; load it before sharding")
        elif key in ours:
            try:
                qweight = QuantizedTensor.from_bnb_state_dict(ours, prefix)
            except QuantError as e:
                error_msgs.append(str(e))
            else:
                if tuple(qweight.shape) != (self.out_features, self.in_features):
                    error_msgs.append(f"{key}: shape {tuple(qweight.shape)} in the checkpoint, "
                                      f"{(self.out_features, self.in_features)} in the model")
                else:
                    self.qweight = qweight.to(self.qweight.device)
        elif strict:
            missing_keys.append(key)
        rest = {k: v for k, v in state_dict.items() if k not in ours}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def is_skipped(name: str, skip: tuple[str, ...]) -> bool:
    """`skip` entries match a module's full dotted name or its trailing part ("lm_head", "mlp.down_proj")."""
    return any(name == s or name.endswith("." + s) for s in skip)


def quantize_model(model: nn.Module, quant_type: str = "nf4", block_size: int = 64, double_quant: bool = True,
                   skip: tuple[str, ...] = ("lm_head",), compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every nn.Linear (except names matching `skip`) by a frozen Linear4bit, and every mixture-of-experts
    experts module by a frozen Experts4bit (tunelab.quant.experts), in place.

    The full-precision weights are dropped as each layer is replaced. Returns `model`.
    """
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and not is_skipped(name, tuple(skip))]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Linear4bit.from_linear(linear, quant_type, block_size, double_quant, compute_dtype))
        linear.weight = None  # release the fp weight even if someone still holds the old module
    from tunelab.quant.experts import quantize_experts  # imports this module

    return quantize_experts(model, quant_type, block_size, double_quant, tuple(skip), compute_dtype)


def model_nbytes(model: nn.Module) -> int:
    """Bytes of a model's weights as stored: parameters, buffers and packed 4-bit weights (shared counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total + packed_nbytes(model)


def packed_nbytes(model: nn.Module) -> int:
    """Bytes of a model's packed 4-bit weights (Linear4bit, Experts4bit) as this process stores them (FSDP: its
    shards)."""
    from tunelab.quant.experts import Experts4bit

    return sum(m.nbytes for m in model.modules() if isinstance(m, (Linear4bit, Experts4bit)))

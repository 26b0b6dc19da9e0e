"""AdamW with 8-bit moments (`train.optimizer: adamw8bit`).

Each moment tensor of a parameter with at least MIN_SIZE elements is stored as blockwise 8-bit codes: per
block of 256 values one fp32 absmax, and per value the index of the nearest entry of the signed 8-bit
dynamic map (tunelab.quant.codebooks.dynamic_map, the code book of bitsandbytes' 8-bit optimizers; Dettmers
et al. 2022, "8-bit Optimizers via Block-wise Quantization"). State per parameter: 2 + 8/256 bytes instead
of AdamW's 8. Each step decodes a parameter's two moments to fp32, applies the usual AdamW update, and
encodes them again, so only one parameter's fp32 moments exist at a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tunelab.quant import codebooks

BLOCK = 256
MIN_SIZE = 4096  # smaller tensors (norms, biases) keep fp32 moments, as bitsandbytes' min_8bit_size


def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat fp32 (n,) -> (uint8 codes (n,), fp32 absmax (ceil(n/256),)): nearest dynamic-map value of
    x / absmax of its block (a zero block gets the code of 0)."""
    n = x.numel()
    blocks = F.pad(x, (0, -n % BLOCK)).view(-1, BLOCK)
    absmax = blocks.abs().amax(1)
    scaled = (blocks / absmax.clamp(min=1e-38)[:, None]).view(-1)[:n]
    code = codebooks.dynamic_map(x.device)  # 256 values, ascending
    return torch.bucketize(scaled, (code[1:] + code[:-1]) / 2).to(torch.uint8), absmax


def decode(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """The fp32 values (n,) back from `encode`'s codes and block absmax."""
    n = codes.numel()
    vals = codebooks.dynamic_map(codes.device)[codes.long()]
    return (F.pad(vals, (0, -n % BLOCK)).view(-1, BLOCK) * absmax[:, None]).view(-1)[:n]


class AdamW8bit(torch.optim.Optimizer):
    """torch.optim.AdamW's update (decoupled weight decay, bias correction) over 8-bit stored moments."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    def _moments(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        st = self.state[p]
        if not st:
            st["step"] = torch.tensor(0.0)
            zero = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
            for k in ("exp_avg", "exp_avg_sq"):
                if p.numel() >= MIN_SIZE:
                    st[f"{k}_codes"], st[f"{k}_absmax"] = encode(zero)
                else:
                    st[k] = zero.clone()
        if "exp_avg" in st:
            return st["exp_avg"], st["exp_avg_sq"]
        return decode(st["exp_avg_codes"], st["exp_avg_absmax"]), decode(st["exp_avg_sq_codes"], st["exp_avg_sq_absmax"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m, v = self._moments(p)  # flat fp32
                st = self.state[p]
                st["step"] += 1
                t = float(st["step"])
                g = p.grad.reshape(-1).float()
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
                update = (m / denom).mul_(-group["lr"] / (1 - beta1**t))
                p.add_(update.view_as(p).to(p.dtype))
                if "exp_avg_codes" in st:
                    st["exp_avg_codes"], st["exp_avg_absmax"] = encode(m)
                    st["exp_avg_sq_codes"], st["exp_avg_sq_absmax"] = encode(v)
        return loss

"""MoE checkpoints on disk hold one 2-D linear per expert; transformers 5 models hold 3-D expert parameters.

The files (hub checkpoints, and what transformers 5's save_pretrained writes back) name, per layer:
  <layer>.mlp.experts.<e>.{gate_proj,up_proj,down_proj}.weight     Qwen2/3-MoE, OLMoE, ... ("qwen2_moe")
  <layer>.block_sparse_moe.experts.<e>.{w1,w3,w2}.weight           Mixtral (and block_sparse_moe.gate.weight)
(Granite-MoE's hold each layer's experts whole, under JetMoE's names: `renamed`), and transformers' loader
(conversion_mapping.py, the "mixtral" and "qwen2_moe" entries) builds
  <layer>.mlp.experts.gate_up_proj = stack over e of cat(gate_e, up_e)   (E, 2I, H)
  <layer>.mlp.experts.down_proj    = stack over e of down_e              (E, H, I)
The streaming 4-bit loader (tunelab.models.load.load_quantized) reads tensor by tensor, so it does the same here:
`ExpertStacker` collects one expert parameter's pieces and hands back the 3-D tensor when the last arrives.
"""

from __future__ import annotations

import re

import torch

from tunelab.errors import TunelabError

_EXPERT_KEY = re.compile(r"(.*)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight")
# file name -> (3-D parameter, position in the concatenation along the output rows)
_PIECES = {"gate_proj": ("gate_up_proj", 0), "w1": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
           "w3": ("gate_up_proj", 1), "down_proj": ("down_proj", 0), "w2": ("down_proj", 0)}


# Granite-MoE's files keep JetMoE's names (transformers' "granitemoe" renaming, the same shapes)
_GRANITE = ((".block_sparse_moe.input_linear.weight", ".block_sparse_moe.experts.gate_up_proj"),
            (".block_sparse_moe.output_linear.weight", ".block_sparse_moe.experts.down_proj"),
            (".block_sparse_moe.router.layer.weight", ".block_sparse_moe.router.weight"))


def renamed(key: str) -> str:
    """A file's name of an MoE tensor as the model names it: Granite-MoE's (input_linear, output_linear,
    router.layer) as its experts and router; Mixtral's MoE block (block_sparse_moe) as mlp."""
    for old, new in _GRANITE:
        if key.endswith(old):
            return key.removesuffix(old) + new
    return key.replace(".block_sparse_moe.", ".mlp.")


class ExpertStacker:
    """Per-expert tensors in, whole 3-D expert parameters out (module doc)."""

    def __init__(self, shapes: dict[str, torch.Size]):
        self.shapes = shapes  # every parameter of the model: name -> shape
        self.pieces: dict[str, dict[tuple[int, int], torch.Tensor]] = {}

    def target(self, key: str) -> str | None:
        """The model's 3-D parameter a file key is a piece of, or None."""
        m = _EXPERT_KEY.fullmatch(key)
        name = m and f"{m.group(1)}.mlp.experts.{_PIECES[m.group(3)][0]}"
        return name if name in self.shapes and len(self.shapes[name]) == 3 else None

    def add(self, key: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """Keep the piece `key` (a key `target` knows); (parameter name, 3-D tensor) once it is complete."""
        m = _EXPERT_KEY.fullmatch(key)
        name, part = self.target(key), _PIECES[m.group(3)][1]
        experts, parts = self.shapes[name][0], 2 if name.endswith("gate_up_proj") else 1
        if int(m.group(2)) >= experts:
            raise TunelabError(f"{key}: expert {m.group(2)}, but the model has {experts} experts; its config.json "
                               "does not fit its weights")
        got = self.pieces.setdefault(name, {})
        got[(int(m.group(2)), part)] = tensor
        if len(got) < experts * parts:
            return None
        del self.pieces[name]
        stacked = torch.stack([torch.cat([got[(e, p)] for p in range(parts)]) for e in range(experts)])
        if stacked.shape != self.shapes[name]:
            raise TunelabError(f"{name}: the checkpoint's experts stack to {tuple(stacked.shape)}, the model's "
                               f"parameter is {tuple(self.shapes[name])}; its config.json does not fit its weights")
        return name, stacked

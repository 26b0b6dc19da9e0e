"""The last-layer shortcut (speed-up `last_layer` of tunelab.accel.kernels): the last decoder layer computes
its outputs only for the positions from the first one that carries a label. Its reference twin is the layer
run whole; the chunked loss (tunelab/train/loss.py `label_hidden`) enters it through Kernels.last_layer_from.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tunelab.accel.fused import rotary


class LastLayerFrom:
    """Context in which the body's last decoder layer computes outputs for positions start.. only.

    The last layer's output at position t feeds only the head at t, so where no loss falls before `start`
    its queries, attention output, MLP and norms for positions < start are never needed; its keys and
    values are, for all positions. About 1.5% of a LoRA step on the bundled model with half of each row a
    prompt (docs/lora.md). The layer then returns (B, T - start, C); `start` is 0 where it runs whole.
    """

    def __init__(self, layer, start: int, kernel: bool = False):
        self.layer, self.start, self.kernel = layer, start, kernel  # kernel: the rotary embedding's C kernel

    def __enter__(self):
        if self.start:
            self.layer.forward = self._forward
        return self

    def __exit__(self, *exc):
        if self.start:
            del self.layer.forward

    def _forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, **kwargs):
        layer, s = self.layer, self.start
        attn = layer.self_attn
        if (cache is not None or kwargs.get("past_key_values") is not None or position_embeddings is None
                or (attention_mask is not None and attention_mask.dim() != 4)):
            self.start = 0
            return type(layer).forward(layer, hidden_states, attention_mask=attention_mask,
                                       position_embeddings=position_embeddings, cache=cache, **kwargs)
        B, T, _ = hidden_states.shape
        x = layer.input_layernorm(hidden_states)
        q = attn.q_proj(x[:, s:]).view(B, T - s, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)
        cos, sin = position_embeddings  # (B or 1, T, head_dim)
        q, k = rotary(q, cos[:, s:], sin[:, s:], self.kernel), rotary(k, cos, sin, self.kernel)
        if attention_mask is None:  # causal: query s + i sees keys 0 .. s + i
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[s:]
        else:
            mask = attention_mask[:, :, s:]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling,
                                           dropout_p=attn.attention_dropout if attn.training else 0.0,
                                           enable_gqa=q.shape[1] != k.shape[1])
        h = hidden_states[:, s:] + attn.o_proj(o.transpose(1, 2).reshape(B, T - s, -1))
        return h + layer.mlp(layer.post_attention_layernorm(h))


def last_layer_from(body, batch: dict, start: int, rotary_kernel: bool = False) -> LastLayerFrom:
    """LastLayerFrom(last layer, start) where it applies; else one that changes nothing (start 0).

    The caller passes start 0 unless the family table says its decoder layer is LlamaDecoderLayer's
    (pre-norm attention and MLP, residual adds) over an attention of Llama's formula (q/k/v/o projections,
    rotary on q and k), which LastLayerFrom re-implements for a suffix of query positions
    (tests/train/test_train_loss.py checks the result against the whole layer). Here: no q/k norms, SDPA or
    eager attention, the sequence within the sliding window."""
    layers = getattr(body, "layers", None)
    layer = layers[-1] if isinstance(layers, nn.ModuleList) and len(layers) else None
    T = batch["input_ids"].shape[1]
    if start <= 0 or layer is None:
        return LastLayerFrom(layer, 0)
    if getattr(layer, "gradient_checkpointing", False) and type(layer).__call__ is not nn.Module.__call__:
        # transformers < 5 checkpoints in __call__ and would replay the layer's own forward in backward,
        # after the context has ended; from 5 on it wraps the class's forward, which ours bypasses.
        return LastLayerFrom(layer, 0)
    attn = getattr(layer, "self_attn", None)
    config = getattr(attn, "config", None)
    window = getattr(attn, "sliding_window", None)
    plain = (attn is not None and not hasattr(attn, "q_norm") and hasattr(attn, "scaling")
             and getattr(config, "_attn_implementation", None) in ("sdpa", "eager")
             and (window is None or T <= window))
    return LastLayerFrom(layer, start if plain else 0, rotary_kernel)

"""Packed rows need attention that keeps to each example: checked on the model itself before training.

A packed row holds several examples, position ids restarting at 0 at each (tunelab.data.packing). transformers
(>= 5, every family of tunelab's table; tests/train/test_train_packing.py) builds the block-diagonal causal mask from
such position ids when no 2-D attention mask and no cache is given, as the loop's collate and loss call it. A
model that does not (its own remote code, an older transformers, an attention implementation that ignores
the packed-sequence mask) would let each example attend to the ones before it in its row: a different, silent
computation. `check_attention` runs the model once on a packed row of two short examples and refuses such
a model with one line.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from tunelab.errors import TunelabError

PROBE = 6  # tokens per probe example


@torch.no_grad()
def _logits(model, ids, pos, mask=None) -> torch.Tensor:
    out = model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False)
    return out.logits.float()


@torch.no_grad()
def check_attention(model, device) -> None:
    """Raise TunelabError unless the model's logits for the second example of a packed row [A, B] equal
    those of B alone to within a tenth of what attending to A moves them (the same row with a plain causal
    mask: an all-ones 2-D attention mask turns the packed reading of position ids off)."""
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (1, 2 * PROBE), generator=g).to(device)
    pos = torch.arange(PROBE).repeat(2)[None].to(device)  # (1, 2 * PROBE): 0..5, 0..5
    was_training = model.training
    model.eval()
    cast = torch.autocast("cuda", dtype=torch.bfloat16) if torch.device(device).type == "cuda" else nullcontext()
    try:
        with cast:
            alone = _logits(model, ids[:, PROBE:], pos[:, :PROBE])
            packed = _logits(model, ids, pos)[:, PROBE:]
            mixed = _logits(model, ids, pos, torch.ones_like(ids))[:, PROBE:]
    finally:
        model.train(was_training)
    err, leak = float((packed - alone).abs().max()), float((mixed - alone).abs().max())
    if not err <= 0.1 * leak:
        kind = getattr(model.config, "model_type", type(model).__name__)
        impl = getattr(model.config, "_attn_implementation", None)
        raise TunelabError(
            f"data.packing=packed: this model ({kind}, attention {impl}) lets an example attend to the one before "
            f"it in a packed row (its logits move by {err:.3g}, against {leak:.3g} with a plain causal mask); use "
            "data.packing=padded"
        )

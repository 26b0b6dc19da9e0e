"""Next-token loss that never builds full-vocabulary logits for tokens that carry no loss.

The output head and cross-entropy are about 30% of a small model's forward pass (1.1 of 3.7 s measured on
SmolLM2-135M, 4x256 tokens). We run the decoder body, keep only the positions whose label is not -100,
and compute head + cross-entropy on those in chunks. The gradient of cross-entropy w.r.t. the logits is
known in closed form (softmax - onehot), so each chunk's input gradient (and the head's weight gradient,
when the head trains) is computed right away in the forward pass and the chunk's logits are freed: peak
memory holds one chunk of logits, and nothing is recomputed in backward (the "fused linear cross-entropy"
of Liger-Kernel, Hsu et al. 2024).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE = -100


# exp() of raw logits is safe when every row's sum of exps is finite and at least this: the terms that can
# flush to zero (< 1.2e-38 each, at most ~1e5 of them) are then below 1e-13 of the sum.
_MIN_SUM = 1e-20


# A frozen head (LoRA, QLoRA, eval) runs in tiles of TOKEN_BLOCK tokens x VOCAB_BLOCK vocabulary rows: each
# slice of W is read by the logits' GEMM and again, still in cache, by the gradient's, and the 8 MB tile
# stays in cache for exp and the row sums. 0.91 -> 0.72 s for 1020 tokens x 49152 vocabulary on 2 cores
# against 256-token chunks of the whole vocabulary (docs/lora.md).
TOKEN_BLOCK, VOCAB_BLOCK = 1024, 2048


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T + b, y_i), with gradients computed chunk by chunk in forward.

    The logits are read and written as few times as possible, in one reused buffer: e = exp(logits) in
    place (no max subtraction unless a row overflows or underflows; then that part is redone the stable
    way), s = row sums. Then CE = log(s) + m - logit_y and the softmax e / s is never formed: its 1/s is
    applied to the (n, C) product instead, d CE / d h = (e @ W) / s - W[y].

    A frozen head in fp32/fp64 goes through vocabulary slices (_frozen_head); a trained head, or a
    half-precision one, through chunks of `chunk` tokens with the full vocabulary (_token_chunks).

    softcap: the logits are z' = cap * tanh(z / cap) (Gemma's final_logit_softcapping), and each gradient
    w.r.t. z is the one w.r.t. z' times dz'/dz = 1 - tanh(z / cap)^2.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk: int, blocks: tuple[int, int], softcap: float | None):
        w = weight.to(h.dtype)
        b = None if bias is None else bias.to(h.dtype)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if ctx.needs_input_grad[2] else None
        if grad_w is None and grad_b is None and h.dtype in (torch.float32, torch.float64):
            loss = _frozen_head(h, w, b, targets, grad_h, chunk, blocks, softcap)
        else:
            loss = _token_chunks(h, w, b, targets, chunk, grad_h, grad_w, grad_b, softcap)
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (grad_h, grad_w, grad_b)))
        ctx.has = (grad_h is not None, grad_w is not None, grad_b is not None)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        saved = ctx.saved_tensors
        gh, gw, gb = (s * grad_loss if has else None for s, has in zip(saved, ctx.has))
        if gw is not None:
            gw = gw.to(ctx.dtypes[0])
        if gb is not None:
            gb = gb.to(ctx.dtypes[1])
        return gh, gw, gb, None, None, None, None


def _token_chunks(h, w, b, targets, chunk, grad_h, grad_w, grad_b, softcap=None) -> torch.Tensor:
    """Summed CE over chunks of `chunk` tokens x the whole vocabulary; fills the given gradients."""
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    buf = torch.empty(min(chunk, h.shape[0]), w.shape[0], device=h.device) if h.dtype == torch.float32 else None
    for i in range(0, h.shape[0], chunk):
        hc, yc = h[i : i + chunk], targets[i : i + chunk]
        e, target, m, s, d = _exp_logits(hc, w, b, yc, buf, softcap)  # e, d (n, V); the rest (n,)
        loss += (s.log() + m - target).sum()
        inv_s = s.reciprocal()  # (n,)
        dy = None  # softcap: dz'/dz at the targets (n,), and e becomes e * dz'/dz
        if d is not None:
            dy = d.gather(1, yc[:, None]).squeeze(1)
            e.mul_(d)
        if grad_h is not None:
            gh = grad_h[i : i + chunk]
            torch.mm(e.to(h.dtype), w, out=gh)
            gh.mul_(inv_s[:, None].to(h.dtype)).sub_(w[yc] if dy is None else w[yc] * dy[:, None].to(h.dtype))
        if grad_w is not None:
            grad_w += e.t() @ (hc.float() * inv_s[:, None])
            grad_w.index_add_(0, yc, hc.float() if dy is None else hc.float() * dy[:, None], alpha=-1.0)
        if grad_b is not None:
            grad_b += e.t() @ inv_s
            grad_b.index_add_(0, yc, torch.ones_like(inv_s) if dy is None else dy, alpha=-1.0)
    return loss


def _frozen_head(h, w, b, targets, grad_h, chunk, blocks, softcap=None) -> torch.Tensor:
    """Summed CE for a head that does not train, in (tokens x vocabulary) tiles; fills grad_h if given.

    Per block of tokens, for each vocabulary slice W_j: z = exp(h W_j^T + b_j) in one reused tile,
    s += row sums of z, G += z W_j. At the end dCE/dh = G / s - W[y] and CE = log s - h . W[y] - b[y].
    A block whose sums overflow or underflow is redone by _token_chunks, which shifts by the row max.
    softcap: z is capped in the tile, and G sums z * (1 - tanh^2) W_j (in a second tile).
    """
    tb, vb = blocks
    n_all, vocab = h.shape[0], w.shape[0]
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    tile = torch.empty(min(tb, n_all) * min(vb, vocab), dtype=h.dtype, device=h.device)
    dtile = torch.empty_like(tile) if softcap else None
    for i in range(0, n_all, tb):
        hc, yc = h[i : i + tb], targets[i : i + tb]
        n = hc.shape[0]
        g = None if grad_h is None else grad_h[i : i + tb].zero_()
        s = hc.new_zeros(n)
        for j in range(0, vocab, vb):
            wj = w[j : j + vb]
            z = torch.mm(hc, wj.t(), out=tile[: n * wj.shape[0]].view(n, wj.shape[0]))
            if b is not None:
                z.add_(b[j : j + vb])
            d = None if dtile is None else _softcap_(z, softcap, dtile[: z.numel()].view_as(z))
            s += z.exp_().sum(1)
            if g is not None:
                g.addmm_(z if d is None else z.mul_(d), wj)
        if not bool(((s >= _MIN_SUM) & torch.isfinite(s)).all()):  # rare: redo with the max shift
            loss += _token_chunks(hc, w, b, yc, chunk, g, None, None, softcap)
            continue
        wy = w[yc]  # (n, C)
        target = (hc * wy).sum(1) if b is None else (hc * wy).sum(1) + b[yc]
        if softcap:
            target = target[:, None]
            wy = wy * _softcap_(target, softcap, torch.empty_like(target))  # (n, C) * dz'/dz at the targets
            target = target.squeeze(1)
        loss += (s.log() - target).sum()
        if g is not None:
            g.div_(s[:, None]).sub_(wy)
    return loss


def _shift_always(z: torch.Tensor) -> bool:
    """On a GPU always shift by the row max: one more pass over the chunk's logits, where the check for the
    fast path (a host read of the sums) would stall the device once per chunk."""
    return z.device.type != "cpu"


def _softcap_(z: torch.Tensor, cap: float, d: torch.Tensor) -> torch.Tensor:
    """z <- cap * tanh(z / cap) in place (the ops and order of Gemma's forward); returns d = 1 - tanh(z / cap)^2
    = dz'/dz, written into `d` (z's shape)."""
    t = z.div_(cap).tanh_()
    torch.mul(t, t, out=d).neg_().add_(1.0)
    t.mul_(cap)
    return d


def _exp_logits(hc, w, b, yc, buf, softcap=None):
    """(e, target, m, s, d) of one chunk: e = exp(logits - m) (n, V) fp32, in `buf` when given; target =
    logits[y] (n,); m the per-row shift (0 on the fast path); s = e.sum(1). CE = log(s) + m - target.
    softcap: the logits are capped, and d (n, V) is the derivative of the cap (else None)."""
    d = None

    def logits():
        nonlocal d
        if buf is None:
            out = F.linear(hc, w, b).float()
        else:
            out = torch.mm(hc, w.t(), out=buf[: hc.shape[0]])
            out = out if b is None else out.add_(b)
        if softcap:
            d = _softcap_(out, softcap, torch.empty_like(out) if d is None else d)
        return out

    z = logits()
    target = z.gather(1, yc[:, None]).squeeze(1)
    if _shift_always(z):
        m = z.amax(1)
        return z, target, m, z.sub_(m[:, None]).exp_().sum(1), d
    s = z.exp_().sum(1)
    m = torch.zeros_like(s)
    if not bool(((s >= _MIN_SUM) & torch.isfinite(s)).all()):  # rare: large or tiny logits; shift by the max
        z = logits()
        m = z.amax(1)
        s = z.sub_(m[:, None]).exp_().sum(1)
    return z, target, m, s, d


def linear_cross_entropy_sum(h: torch.Tensor, head: nn.Linear, targets: torch.Tensor, chunk: int = 256,
                             blocks: tuple[int, int] | None = None, logits: tuple[str, float] | None = None):
    """Summed cross-entropy of `head(h)` against `targets`; h (N, C), targets (N,) without -100.

    chunk: tokens per chunk (with the whole vocabulary) when the head trains or runs in half precision;
    blocks: (tokens, vocabulary rows) per tile for a frozen fp32/fp64 head (default TOKEN_BLOCK, VOCAB_BLOCK);
    logits: the family's transform of head(h) (tunelab.models.families.logits_transform): ("scale", s)
    multiplies them (as s * h through the head: autograd carries s to h and the bias), ("softcap", cap) caps
    them inside the chunks.
    """
    blocks = (TOKEN_BLOCK, VOCAB_BLOCK) if blocks is None else tuple(blocks)
    h, bias, softcap = _transformed(h, head, logits)
    return _LinearCrossEntropy.apply(h, head.weight, bias, targets, chunk, blocks, softcap)


def _transformed(h, head: nn.Linear, logits: tuple[str, float] | None):
    """(h, bias, softcap) with the family's logits transform: a scale goes into h and the bias (autograd
    carries it back), a softcap is returned for the chunks to apply."""
    if logits is not None and logits[0] == "scale":
        return h * logits[1], None if head.bias is None else head.bias * logits[1], None
    return h, head.bias, None if logits is None else logits[1]


def _chunk_log_probs(h, weight, bias, targets, softcap):
    """log softmax(h W^T + b)[y] of one chunk (n,), in float32 or wider; the chunk's (n, V) logits are
    freed on return (and rebuilt in backward by the checkpoint around this function)."""
    z = F.linear(h, weight.to(h.dtype), None if bias is None else bias.to(h.dtype))
    z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    if softcap:
        z = torch.tanh(z / softcap) * softcap  # Gemma's final_logit_softcapping
    return z.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)


def linear_log_probs(h: torch.Tensor, head: nn.Linear, targets: torch.Tensor, chunk: int = 256,
                     logits: tuple[str, float] | None = None) -> torch.Tensor:
    """Per-token log p(y | h) = log_softmax(head(h))[y], (N,), without the (N, V) logits: chunks of `chunk`
    tokens, each under activation checkpointing, so forward keeps one chunk's logits at a time and
    backward recomputes them chunk by chunk. Unlike linear_cross_entropy_sum, every row gets its own
    gradient weight (a preference loss weighs each sequence differently), so the gradient cannot be
    formed in forward. logits: the family's transform, as in linear_cross_entropy_sum."""
    from torch.utils.checkpoint import checkpoint

    h, bias, softcap = _transformed(h, head, logits)
    parts = [checkpoint(_chunk_log_probs, h[i : i + chunk], head.weight, bias, targets[i : i + chunk], softcap,
                        use_reentrant=False) for i in range(0, h.shape[0], chunk)]
    return torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)


def causal_lm_loss_sum(model, batch: dict, chunk: int = 256, kernels=None) -> tuple[torch.Tensor, int]:
    """(summed next-token loss, number of label tokens) of a Hugging Face causal LM on a batch.

    `batch["labels"]` follows the Hugging Face convention: aligned with input_ids, -100 where no loss;
    position t predicts labels[t + 1]. `kernels` (tunelab.accel.kernels.choose; default: train.kernels=auto
    for this model) says the path: the chunked head + loss with the family's logits transform, and where
    every row's first loss falls at position s > 0 (a prompt), the last decoder layer computes its outputs
    for positions s.. only (the last-layer shortcut, tunelab.accel.last_layer); or, for `off` and a family not in the table, the
    model's own forward (`reference_loss_sum`).
    """
    if kernels is None:
        from tunelab.accel.kernels import choose

        kernels = choose(model, "auto", batch["input_ids"].device)
    if not kernels.chunked_head:
        return reference_loss_sum(model, batch)
    out, h, y, _ = label_hidden(model, batch, kernels)
    head = model.get_output_embeddings()
    total = linear_cross_entropy_sum(h, head, y, chunk, logits=kernels.logits)
    if kernels.router_aux:
        # the model's forward adds coef * aux to its mean loss; to the sum, coef * aux * count
        total = total + model.router_aux_loss_coef * _router_aux_loss(model, out, batch) * y.numel()
    return total, int(y.numel())


def label_hidden(model, batch: dict, kernels):
    """The body's last hidden states at the positions that carry a label: (body output, h (N, C), targets
    (N,), row (N,) the batch row of each). The last decoder layer runs from the first labelled position
    where kernels.last_layer allows (tunelab.accel.last_layer)."""
    body = getattr(model, model.base_model_prefix)
    targets = batch["labels"][:, 1:]  # (B, T-1)
    keep = targets != IGNORE
    cols = keep.any(0).nonzero()
    start = int(cols[0]) if cols.numel() else 0
    layer = kernels.last_layer_from(body, batch, start)  # start 0 (the layer whole) when the shortcut is off
    extra = {"output_router_logits": True} if kernels.router_aux else {}
    with layer:
        out = body(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            use_cache=False,
            **extra,
        )
    start = layer.start  # 0 where the last layer ran whole
    hidden = out.last_hidden_state[:, :-1]  # (B, T-1-start, C)
    keep = keep[:, start:]
    row = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep)[keep]
    return out, hidden[keep], targets[:, start:][keep], row


def _router_aux_loss(model, out, batch: dict) -> torch.Tensor:
    """transformers' own load_balancing_loss_func of the model's modeling module, called as its forward
    calls it: the router logits of every layer, the model's expert counts, the (B, T) attention mask."""
    import sys

    balance = sys.modules[type(model).__module__].load_balancing_loss_func
    return balance(out.router_logits, model.num_experts, model.num_experts_per_tok, batch.get("attention_mask"))


def reference_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """The model's own forward with labels (full logits, its own logits transform and auxiliary losses):
    its mean loss times the label count, so the loop normalises it as the chunked sum."""
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                position_ids=batch.get("position_ids"), labels=batch["labels"] if n else None, use_cache=False)
    if n == 0:  # no label token: transformers' mean would be 0 / 0
        return out.logits.sum() * 0.0, 0
    return out.loss * n, n


def token_classification_loss_sum(model, batch: dict, chunk: int = 256, kernels=None) -> tuple[torch.Tensor, int]:
    """(summed token cross-entropy, labelled tokens) of a token classifier (tunelab.models.token_cls): position
    t's logits are scored against labels[t] itself (no shift), -100 = no loss. `chunk`, `kernels`: unused (the
    head has a handful of outputs, its logits are small)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                   position_ids=batch.get("position_ids")).logits  # (B, T, labels)
    labels = batch["labels"]
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, int((labels != IGNORE).sum())


@dataclass(frozen=True)
class Objective:
    """What the training loop minimises: `loss_sum(model, batch, chunk, kernels) -> (sum, tokens)`,
    `label_tokens(labels) -> tokens with a loss` (the divisor of the global mean), and optional `metrics(model)
    -> dict` added to the log at every evaluation, `step_metrics() -> dict` added at every step, and
    `collate(rows, pad_id, device) -> batch` in place of the loop's (a preference objective's pairs)."""

    loss_sum: Callable
    label_tokens: Callable
    metrics: Callable | None = None
    step_metrics: Callable | None = None
    collate: Callable | None = None


NEXT_TOKEN = Objective(causal_lm_loss_sum, lambda labels: int((labels[:, 1:] != IGNORE).sum()))
TOKEN_CLASSIFICATION = Objective(token_classification_loss_sum, lambda labels: int((labels != IGNORE).sum()))

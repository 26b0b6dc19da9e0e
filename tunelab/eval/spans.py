"""Span detection: mark the injected tokens in a document, the seed of a guard in front of a model.

A causal LM becomes a token classifier (`LlamaForTokenClassification`-style: the LM body plus a linear
`score` head, 2 labels: 0 = document, 1 = injected). LoRA adapts the body; the new head trains in full as
a `modules_to_save` module. Training data are injection items (tunelab.eval.injection) of the train styles
with their character spans turned into token labels; evaluation uses the held-out styles.

Metrics: token-level precision / recall / F1 of label 1, and span-level ones where a span is a maximal run
of 1s and a predicted span matches a gold span when their token IoU is >= 0.5 (each gold span matched once).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from tunelab.eval.tasks import Item


def token_labels(tokenizer, item: Item, max_len: int = 384) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of an item's prompt: label 1 on every token overlapping meta["span"]."""
    enc = tokenizer(item.prompt, add_special_tokens=False, return_offsets_mapping=True,
                    truncation=True, max_length=max_len)
    span = item.meta.get("span")
    labels = [int(span is not None and a < span[1] and b > span[0]) for a, b in enc["offset_mapping"]]
    return enc["input_ids"], labels


def runs(labels: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of label 1 as [start, end) token ranges."""
    out, start = [], None
    for i, v in enumerate(list(labels) + [0]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append((start, i))
            start = None
    return out


def close_gaps(labels: list[int], gap: int) -> list[int]:
    """Fill runs of <= `gap` zeros between two 1s: one missed token inside an injection should not split it
    into two spans (the decoding a guard would use before cutting spans out)."""
    out = list(labels)
    spans = runs(labels)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        if start - end <= gap:
            out[end:start] = [1] * (start - end)
    return out


def _prf(tp: int, n_pred: int, n_gold: int) -> dict:
    p = tp / n_pred if n_pred else (1.0 if n_gold == 0 else 0.0)
    r = tp / n_gold if n_gold else (1.0 if n_pred == 0 else 0.0)
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def span_metrics(pred: list[list[int]], gold: list[list[int]], iou: float = 0.5) -> dict:
    """{"token": P/R/F1 of label 1 over all tokens, "span": P/R/F1 of runs matched at IoU >= iou}."""
    tp = n_pred = n_gold = 0
    s_tp = s_pred = s_gold = 0
    for p, g in zip(pred, gold, strict=True):
        tp += sum(a and b for a, b in zip(p, g, strict=True))
        n_pred, n_gold = n_pred + sum(p), n_gold + sum(g)
        ps, gs = runs(p), runs(g)
        s_pred, s_gold = s_pred + len(ps), s_gold + len(gs)
        unmatched = list(gs)
        for a, b in ps:
            for gspan in unmatched:
                inter = max(0, min(b, gspan[1]) - max(a, gspan[0]))
                if inter / (max(b, gspan[1]) - min(a, gspan[0])) >= iou:
                    unmatched.remove(gspan)
                    s_tp += 1
                    break
    return {"token": _prf(tp, n_pred, n_gold), "span": _prf(s_tp, s_pred, s_gold)}


def token_classifier(folder, lora_r: int = 8, lora_alpha: float = 16.0, seed: int = 0, layers: int | None = None):
    """A 2-label token classifier from a causal-LM folder, with LoRA on every linear and a trainable head.

    `layers` keeps only the first k transformer layers (a cheaper guard: spotting an instruction that does
    not belong to a document needs less depth than answering); None keeps them all.
    """
    from transformers import AutoModelForTokenClassification

    from tunelab.lora import LoraConfig, apply_lora

    torch.manual_seed(seed)  # the new `score` head is initialised randomly
    extra = {"num_hidden_layers": layers} if layers else {}
    model = AutoModelForTokenClassification.from_pretrained(folder, num_labels=2, dtype=torch.float32, **extra)
    cfg = LoraConfig(r=lora_r, alpha=lora_alpha, target_modules="all-linear", modules_to_save=["score"])
    return apply_lora(model, cfg, verbose=False)


def _batch(rows: list[tuple[list[int], list[int]]], pad_id: int):
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, (i, lab) in enumerate(rows):
        ids[r, :len(i)], labels[r, :len(i)], mask[r, :len(i)] = torch.tensor(i), torch.tensor(lab), 1
    return ids, labels, mask


def train_detector(model, tokenizer, items: list[Item], steps: int = 100, batch_size: int = 8, lr: float = 1e-3,
                   seed: int = 0, log_every: int = 10) -> list[float]:
    """AdamW on the trainable (LoRA + head) parameters, cycling through `items` in a seeded order; returns losses."""
    rows = [token_labels(tokenizer, it) for it in items]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    model.train()
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        batch = [rows[order[(step * batch_size + j) % len(rows)]] for j in range(batch_size)]
        ids, labels, mask = _batch(batch, pad)
        logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, 2)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"span detector step {step + 1}/{steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    return losses


@torch.no_grad()
def predict(model, tokenizer, items: list[Item], batch_size: int = 16) -> list[list[int]]:
    """Predicted 0/1 label per token of each item's prompt (argmax)."""
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [token_labels(tokenizer, it) for it in items]
    out = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        ids, _, mask = _batch(batch, pad)
        pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)  # (B, T)
        out += [pred[r, :len(i)].tolist() for r, (i, _) in enumerate(batch)]
    return out


def evaluate_detector(model, tokenizer, items: list[Item], batch_size: int = 16) -> dict:
    """span_metrics of the detector on items (clean items included: any mark on them is a false positive)."""
    t0 = time.perf_counter()
    pred = predict(model, tokenizer, items, batch_size)
    seconds = time.perf_counter() - t0
    gold = [token_labels(tokenizer, it)[1] for it in items]
    return {**span_metrics(pred, gold), "items_per_s": len(items) / seconds, "n": len(items)}

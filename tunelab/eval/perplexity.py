"""Perplexity on held-out text: token-weighted mean negative log-likelihood, batched, without gradients.

Texts are tokenized one by one and cut into non-overlapping windows of `seq_len` tokens; each window is a
row, rows are right-padded into batches and padding is masked with label -100. The loss is the sum of the
NLL of every predicted token divided by their count (not a mean of per-batch means), so the result does not
depend on the batch size. Pre-tokenized examples ({"input_ids", optional "labels"}) are scored as given,
which is how SFT data is scored on its response tokens only.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from tunelab.errors import TunelabError

IGNORE = -100


def _rows(texts_or_examples, tokenizer, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) rows of at most seq_len tokens."""
    rows = []
    for ex in texts_or_examples:
        if isinstance(ex, str):
            if tokenizer is None:
                raise TunelabError("perplexity on raw text needs a tokenizer")
            ids = tokenizer(ex, add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                ids = ids + [tokenizer.eos_token_id]  # documents end with EOS, as in pretraining
            rows += [(ids[i:i + seq_len], ids[i:i + seq_len]) for i in range(0, len(ids), seq_len)]
        else:
            ids = list(ex["input_ids"])
            labels = list(ex.get("labels", ids))
            if len(labels) != len(ids):
                raise TunelabError(f"an example has {len(ids)} input_ids but {len(labels)} labels")
            rows += [(ids[i:i + seq_len], labels[i:i + seq_len]) for i in range(0, len(ids), seq_len)]
    return [r for r in rows if len(r[0]) >= 2]  # a 1-token window predicts nothing


@torch.no_grad()
def perplexity(model, texts_or_examples, tokenizer=None, seq_len: int = 512, batch_size: int = 8) -> dict:
    """{"loss": mean NLL per predicted token (nats), "ppl": exp(loss), "tokens": count, "tokens_per_s"}."""
    rows = sorted(_rows(texts_or_examples, tokenizer, seq_len), key=lambda r: len(r[0]))
    if not rows:
        raise TunelabError("no text to score: every text was empty or shorter than 2 tokens")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    t0 = time.perf_counter()
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for r, (row_ids, row_labels) in enumerate(batch):
                ids[r, :len(row_ids)] = torch.tensor(row_ids)
                labels[r, :len(row_ids)] = torch.tensor(row_labels)
                mask[r, :len(row_ids)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
            # position t predicts token t+1
            shifted = labels[:, 1:].to(device)
            nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), shifted.flatten(),
                                  ignore_index=IGNORE, reduction="sum")
            total += nll.item()
            count += int((shifted != IGNORE).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise TunelabError("no labelled tokens to score (every label is -100)")
    loss = total / count
    return {"loss": loss, "ppl": math.exp(loss), "tokens": count, "tokens_per_s": count / (time.perf_counter() - t0)}


def perplexity_by_source(model, sources: dict[str, list[str]], tokenizer, seq_len: int = 512,
                         batch_size: int = 8) -> dict[str, dict]:
    """Perplexity per source of a mixture: {source name: perplexity(...) of its texts}."""
    return {name: perplexity(model, texts, tokenizer, seq_len, batch_size) for name, texts in sources.items()}

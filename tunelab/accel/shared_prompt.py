"""The shared prompt (speed-up `shared_prompt` of tunelab.accel.kernels): a preference pair's prompt runs once
for both of its responses. Its reference twin is each pair as two sequences, chosen and rejected, each with
the whole prompt (tunelab.train.preference.collate_pairs); tests/train/test_preference.py checks the log-probs and
gradients against it, tests/train/test_train_preference.py the loop's first step against TRL's.

A pair [prompt, chosen] + [prompt, rejected] becomes one sequence
    prompt[:-1] | prompt[-1], chosen | prompt[-1], rejected
each response after its own copy of the last prompt token (position p-1, whose output predicts the
response's first token), with position ids as in the two sequences and a 4-D boolean attention mask in which
a token attends causally to the shared part and to its own segment only. So every response token sees
exactly what it sees in the twin, and with prompts of 200 tokens and responses of 30 a batch holds 263
tokens per pair instead of 462: the forward, the activations kept for backward and the reference forward
shrink with them. transformers hands a 4-D mask to SDPA attention as given; where a model would replace
it (sliding windows, other attention kernels) `choose` leaves this off.
"""

from __future__ import annotations

import torch

IGNORE = -100


def shared_row(chosen: dict, rejected: dict) -> dict | None:
    """One sequence for a pair given as two ({input_ids, labels, position_ids} each, labels -100 on the
    prompt), with "segment": 0 for the shared tokens, 1 chosen, 2 rejected. None when the two do not
    start with the same prompt."""
    c, r = chosen, rejected
    p = next((i for i, y in enumerate(c["labels"]) if y != IGNORE), 0)
    if p == 0 or c["input_ids"][:p] != r["input_ids"][:p] or any(y != IGNORE for y in r["labels"][:p]):
        return None
    nc, nr = len(c["input_ids"]) - p + 1, len(r["input_ids"]) - p + 1
    return {"input_ids": c["input_ids"] + r["input_ids"][p - 1:], "labels": c["labels"] + r["labels"][p - 1:],
            "position_ids": list(range(p - 1 + nc)) + list(range(p - 1, p - 1 + nr)),
            "segment": [0] * (p - 1) + [1] * nc + [2] * nr}


def collate(pairs: list[tuple[dict, dict]], pad_id: int, device) -> dict | None:
    """P (chosen, rejected) pairs -> a batch of P sequences (`shared_row`, right-padded): input_ids, labels,
    position_ids (P, T); attention_mask (P, 1, T, T) boolean, True where query t may attend to key s;
    "sequence" (P, T): for each label, which of the 2P responses [chosen_0 .. chosen_{P-1}, rejected_0 ..]
    it belongs to (-1 where no label). None when some pair does not share its prompt."""
    rows = [shared_row(c, r) for c, r in pairs]
    if any(s is None for s in rows):
        return None
    P, T = len(rows), max(len(s["input_ids"]) for s in rows)
    ids = torch.full((P, T), pad_id, dtype=torch.long)
    labels = torch.full((P, T), IGNORE, dtype=torch.long)
    pos = torch.zeros((P, T), dtype=torch.long)
    segment = torch.full((P, T), -1, dtype=torch.long)  # -1: padding, which attends to itself and the prompt
    for i, s in enumerate(rows):
        n = len(s["input_ids"])
        for t, f in ((ids, "input_ids"), (labels, "labels"), (pos, "position_ids"), (segment, "segment")):
            t[i, :n] = torch.tensor(s[f])
    causal = torch.ones(T, T, dtype=torch.bool).tril()  # (query, key)
    allowed = causal & ((segment[:, :, None] == segment[:, None, :]) | (segment[:, None, :] == 0))  # (P, T, T)
    # row i's chosen response is i, its rejected one P + i
    sequence = torch.where(labels != IGNORE, torch.arange(P)[:, None] + (segment == 2).long() * P, -1)
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": allowed[:, None],
             "sequence": sequence}
    return {k: v.to(device) for k, v in batch.items()}

"""Packing token sequences into training rows.

packed: rows of exactly seq_len tokens. `position_ids` restart at 0 at each document start and at each row
  start, and the first label of every document is -100 so no loss asks the model to predict a document's
  first token from the one before it. The trainer gives packed rows no attention mask, so transformers reads
  the documents off the position ids and attention stays inside each (a block-diagonal causal mask for
  eager/SDPA, FlashAttention's varlen path on CUDA; tunelab.train.loop.collate, tunelab.train.packed).
padded: one document per row, len <= seq_len; the trainer's collate pads (labels -100).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

IGNORE = -100
Doc = tuple[list[int], list[int]]  # (input_ids, labels), same length


def _row(ids: list[int], labels: list[int], positions: list[int]) -> dict:
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def pack(docs: Iterable[Doc], seq_len: int, pad_id: int, split_docs: bool = True) -> Iterator[dict]:
    """Rows of exactly seq_len tokens. split_docs=True (pretraining) lets a document run on into the next
    row; False (SFT) starts a new row for a document that does not fit, padding the rest (pad labels -100).
    A document longer than seq_len with split_docs=False is a caller bug and raises ValueError."""
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []

    def pad_out() -> dict:
        n = seq_len - len(ids)
        return _row(ids + [pad_id] * n, labels + [IGNORE] * n, pos + list(range(n)))

    for doc_ids, doc_labels in docs:
        if not doc_ids:
            continue
        doc_labels = [IGNORE] + list(doc_labels[1:])  # never predict a document's first token
        if not split_docs:
            if len(doc_ids) > seq_len:
                raise ValueError(f"a document of {len(doc_ids)} tokens does not fit seq_len={seq_len}")
            if len(ids) + len(doc_ids) > seq_len:
                yield pad_out()
                ids, labels, pos = [], [], []
        offset = 0
        while offset < len(doc_ids):
            take = min(seq_len - len(ids), len(doc_ids) - offset)
            ids += doc_ids[offset:offset + take]
            labels += doc_labels[offset:offset + take]
            pos += range(take)  # restart at 0: a new document, or the same one continuing in a new row
            offset += take
            if len(ids) == seq_len:
                yield _row(ids, labels, pos)
                ids, labels, pos = [], [], []
    if ids:
        yield pad_out()


def padded(docs: Iterable[Doc], seq_len: int) -> Iterator[dict]:
    """One row per document (cut to seq_len), positions 0..n-1, first label -100."""
    for doc_ids, doc_labels in docs:
        doc_ids = list(doc_ids[:seq_len])
        if doc_ids:
            yield _row(doc_ids, [IGNORE] + list(doc_labels[1:seq_len]), list(range(len(doc_ids))))

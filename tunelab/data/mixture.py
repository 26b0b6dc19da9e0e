"""Pretraining mixtures: sources drawn by weight, counted in tokens.

Each source is a stream of tokenized documents (shuffled through a buffer, so a source larger than memory
streams), cut into pieces of at most `piece_len` tokens; a piece is the unit the mixture draws, so one long
file cannot swing the shares. The mixture always draws next from the active source furthest below its
asked share, i.e. the smallest tokens_i / weight_i: realised token shares then stay within one piece of
the asked ones at every point (a random draw by weight would only match them on average).

Passes: the first pass over a source runs the quality filter (and sets eval documents aside); later
passes replay the kept training documents in a new order. `epochs` caps the passes (fractional: part of
the last pass); None repeats freely.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from tunelab.data.config import SourceConfig
from tunelab.data.filters import QualityFilter
from tunelab.data.sources import field_text, iter_rows
from tunelab.errors import DataError

SHUFFLE_BUFFER = 512  # documents held for the streaming shuffle (files are often large: code)
TOKENIZE_BATCH = 64           # documents per tokenizer call (the Rust tokenizer threads over a batch)
TOKENIZE_BATCH_CHARS = 1 << 17  # ... but no more text than this, so a draw never tokenizes far ahead


@dataclass
class SourceStats:
    """What the mixture drew from one source."""

    name: str
    kind: str
    weight: float
    docs: int = 0        # distinct documents drawn (first pass)
    pieces: int = 0
    tokens: int = 0
    passes_started: int = 0
    eval_docs: int = 0
    samples: list[str] = field(default_factory=list)


def iter_texts(src: SourceConfig, skip_bad_rows: bool = False, skipped: list[DataError] | None = None) -> Iterator[str]:
    """The text of every row of a source; a row without a string `text_field` is a DataError (or skipped)."""
    for line, row in iter_rows(src.path, src.format, src.text_field, skip_bad_rows, skipped, src.extensions, **src.hub()):
        try:
            yield field_text(row, src.text_field, src.path, line)
        except DataError as e:
            if not skip_bad_rows:
                raise
            if skipped is not None:
                skipped.append(e)


def shuffled(items: Iterator, rng: random.Random, size: int = SHUFFLE_BUFFER) -> Iterator:
    """A streaming shuffle: keep `size` items, emit a random one as each new item arrives."""
    buf = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


class SourceStream:
    """One source as a stream of (piece token ids, document text), over as many passes as allowed."""

    def __init__(
        self, src: SourceConfig, encode: Callable[[list[str]], list[list[int]]], eos_id: int, piece_len: int,
        qfilter: QualityFilter, seed: int, max_passes: float | None, eval_fraction: float = 0.0,
        skip_bad_rows: bool = False, skipped: list[DataError] | None = None,
    ):
        self.src, self.encode, self.eos_id, self.piece_len = src, encode, eos_id, piece_len
        self.qfilter, self.seed, self.max_passes = qfilter, seed, max_passes
        self.eval_fraction, self.skip_bad_rows, self.skipped = eval_fraction, skip_bad_rows, skipped
        self.stats = SourceStats(src.name, src.kind, src.weight)
        self.eval_texts: list[str] = []
        self._train: set[int] = set()  # indices (in reading order) of kept training documents

    def _first_pass(self) -> Iterator[tuple[int, str]]:
        for i, text in enumerate(iter_texts(self.src, self.skip_bad_rows, self.skipped)):
            if self.qfilter.keep(text):
                self._train.add(i)
                yield i, text

    def _hold_out(self, docs: Iterator[tuple[int, str]]) -> Iterator[tuple[int, str]]:
        """Set about eval_fraction of the drawn first-pass documents aside for eval (never trained on)."""
        rng = random.Random(f"{self.seed}:eval:{self.src.name}")
        for i, text in docs:
            if rng.random() < self.eval_fraction:
                self._train.discard(i)
                self.eval_texts.append(text)
                self.stats.eval_docs += 1
            else:
                yield i, text

    def _replay(self) -> Iterator[tuple[int, str]]:
        for i, text in enumerate(iter_texts(self.src, self.skip_bad_rows, None)):
            if i in self._train:
                yield i, text

    def _pass(self, n: int) -> Iterator[tuple[int, str]]:
        rng = random.Random(f"{self.seed}:pass{n}:{self.src.name}")
        docs = shuffled(self._first_pass() if n == 0 else self._replay(), rng)
        if n == 0:
            docs = self._hold_out(docs)
        if self.max_passes is not None and n + 1 > self.max_passes:  # a fractional last pass
            docs = itertools.islice(docs, round((self.max_passes - n) * len(self._train)))
        return docs

    def __iter__(self) -> Iterator[tuple[list[int], str]]:
        for n in itertools.count():
            if self.max_passes is not None and n >= self.max_passes:
                return
            self.stats.passes_started = n + 1
            drew = False
            docs = self._pass(n)
            while batch := _batch(docs):
                for (_, text), ids in zip(batch, self.encode([t for _, t in batch])):
                    drew = True
                    if n == 0:
                        self.stats.docs += 1
                    ids = ids + [self.eos_id]  # EOS ends every document
                    for k in range(0, len(ids), self.piece_len):
                        yield ids[k:k + self.piece_len], text
            if not drew:
                return  # nothing kept: repeating would loop forever


def _batch(docs: Iterator[tuple[int, str]]) -> list[tuple[int, str]]:
    """The next documents to tokenize together: up to TOKENIZE_BATCH, or TOKENIZE_BATCH_CHARS of text."""
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc[1])
        if len(batch) == TOKENIZE_BATCH or chars >= TOKENIZE_BATCH_CHARS:
            break
    return batch


def mix(streams: list[SourceStream], max_tokens: int | None) -> Iterator[tuple[int, list[int]]]:
    """(source index, piece) in mixture order until max_tokens (the last piece is cut to land on it).
    With max_tokens=None, stop when the first source runs out, so shares stay as asked."""
    its = [iter(s) for s in streams]
    active = list(range(len(streams)))
    total = 0
    while active and (max_tokens is None or total < max_tokens):
        i = min(active, key=lambda j: (streams[j].stats.tokens / streams[j].src.weight, j))
        piece = next(its[i], None)
        if piece is None:
            if max_tokens is None:
                return
            active.remove(i)  # exhausted its epochs: the others share its part from here on
            continue
        ids, text = piece
        if max_tokens is not None:
            ids = ids[: max_tokens - total]
        st = streams[i].stats
        st.tokens += len(ids)
        st.pieces += 1
        if len(st.samples) < 3 and text not in st.samples:
            st.samples.append(text)
        total += len(ids)
        yield i, ids

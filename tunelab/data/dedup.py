"""Exact and near-duplicate detection.

Exact: a 128-bit BLAKE2 hash of the normalised text (NFKC, lower case, whitespace collapsed).
Near: MinHash signatures over character 5-grams of the normalised text, LSH banding as datasketch's
MinHashLSH chooses it (tuned for recall); an LSH candidate counts as a duplicate only if its estimated Jaccard similarity is >= the
threshold. Character shingles (not word 5-grams) keep a few changed words from breaking the match: one
changed word alters ~len(word)+4 of a document's shingles, where it would alter 5 word 5-grams.

Signatures are computed in numpy for a whole batch of documents at once (no Python loop per shingle):
  bytes -> 5-byte windows -> 64-bit multiplicative hash -> murmur3 fmix32 -> (a_k * h + b_k) mod 2^32 for
  k in num_perm permutations (odd a_k: a bijection) -> min over each document's windows.
This is datasketch's "affine32" scheme (fmix, then an affine map per permutation).
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

SHINGLE = 5  # characters per shingle


def normalise(text: str) -> str:
    """NFKC, lower case, runs of whitespace collapsed to one space, stripped."""
    # str.split() splits on exactly the characters regex \s matches (checked over every code point), 3x faster
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def text_hash(text: str) -> bytes:
    """16-byte hash of the normalised text: equal for texts that differ only in case and spacing."""
    return hashlib.blake2b(normalise(text).encode("utf-8"), digest_size=16).digest()


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer: spreads every input bit over every output bit. uint32 in/out."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


class MinHasher:
    """Batched MinHash signatures, (n_docs, num_perm) uint32, for character shingles."""

    def __init__(self, num_perm: int = 128, seed: int = 1, shingle: int = SHINGLE):
        if not 1 <= shingle <= 8:
            raise ValueError(f"shingle={shingle}: 1 to 8 bytes (a window is read as one uint64)")
        rng = np.random.RandomState(seed)
        self.num_perm, self.seed, self.shingle = num_perm, seed, shingle
        self.a = (rng.randint(0, 1 << 31, num_perm, dtype=np.uint64) * 2 + 1).astype(np.uint32)  # odd
        self.b = rng.randint(0, 1 << 32, num_perm, dtype=np.uint64).astype(np.uint32)

    def shingle_hashes(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """All documents' shingle hashes, concatenated (S,) uint32, and each document's first index (n,)."""
        k = self.shingle
        # Pad short texts to one full shingle so every document has at least one window.
        blobs = [normalise(t).encode("utf-8").ljust(k, b"\0") for t in texts]
        lengths = np.fromiter(map(len, blobs), dtype=np.int64, count=len(blobs))
        joined = b"".join(blobs)
        n_start = len(joined) - k + 1
        # The window starting at byte i: a little-endian uint64 read at i (unaligned, stride 1 byte), its low
        # k bytes kept: b[i] + b[i+1] << 8 + ... + b[i+k-1] << 8(k-1). (n_start,) uint64.
        raw = np.ndarray((n_start,), dtype="<u8", buffer=joined + bytes(8 - k), strides=(1,))
        word = raw & np.uint64((1 << (8 * k)) - 1)
        # Drop the windows that start in a document's last k-1 bytes: they run into the next document.
        inside = np.ones(n_start, dtype=bool)
        inside[(np.cumsum(lengths)[:-1, None] - np.arange(1, k)).ravel()] = False
        h64 = word[inside] * np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: high bits mix all input bits
        h = _fmix32((h64 >> np.uint64(32)).astype(np.uint32))
        n_win = lengths - k + 1
        first = np.cumsum(n_win) - n_win
        return h, first

    def _batch_signatures(self, texts: Sequence[str]) -> np.ndarray:
        h, first = self.shingle_hashes(texts)
        out = np.empty((self.num_perm, len(texts)), dtype=np.uint32)
        perm = np.empty_like(h)  # reused: a batch's (S,) pass stays in cache
        # One permutation at a time keeps each pass contiguous: (S,) -> min per document (n,).
        for p in range(self.num_perm):
            np.multiply(h, self.a[p], out=perm)
            np.add(perm, self.b[p], out=perm)
            np.minimum.reduceat(perm, first, out=out[p])
        return out.T

    def signatures(self, texts: Sequence[str], batch_chars: int = 1 << 18, workers: int | None = None) -> np.ndarray:
        """(len(texts), num_perm) uint32 MinHash signatures. Texts go in batches of ~batch_chars characters
        (memory ~ a few times batch_chars * 8 bytes; 256K: a permutation's pass over a batch stays in the
        L2 cache, 1.5x faster than 1M) over `workers` threads (default: all cores, at most 4);
        numpy releases the GIL in the per-permutation passes, so threads use the cores."""
        bounds, size = [0], 0
        for j, t in enumerate(texts):
            size += len(t)
            if size >= batch_chars:
                bounds.append(j + 1)
                size = 0
        if bounds[-1] != len(texts):
            bounds.append(len(texts))
        batches = [texts[a:b] for a, b in zip(bounds, bounds[1:])]
        workers = workers or min(4, os.cpu_count() or 1)
        if workers == 1 or len(batches) == 1:
            parts = [self._batch_signatures(b) for b in batches]
        else:
            with ThreadPoolExecutor(workers) as pool:
                parts = list(pool.map(self._batch_signatures, batches))
        return np.concatenate(parts) if parts else np.empty((0, self.num_perm), dtype=np.uint32)


class NearDedup:
    """Near-duplicate detection, streaming: `seen(text)` says whether a near-duplicate of `text` was kept
    before; if not, `text` is kept (indexed). `add_batch` does the same for many texts at once.

    LSH banding: datasketch's MinHashLSH chooses bands x rows for the threshold (weighting a missed pair 9x
    a false candidate: 14 x 9 at 0.8 with 128 permutations). The band tables are plain dicts keyed by a
    numpy hash of each band, computed for a whole batch at once: MinHashLSH's own per-document insert and
    query (a byteswap and a storage call per band) took ~4x longer than the signatures themselves.
    tests/data/test_data_filters.py checks that the result equals MinHashLSH's on the same signatures.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, seed: int = 1):
        from datasketch import MinHashLSH

        params = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))
        self.bands, self.rows = params.b, params.r
        self.threshold = threshold
        self.need = int(np.ceil(threshold * num_perm - 1e-9))  # equal slots for estimated J >= threshold
        self.hasher = MinHasher(num_perm, seed)
        self.tables: list[dict[int, list[int]]] = [{} for _ in range(self.bands)]
        self.kept: list[np.ndarray] = []  # signatures of kept texts (the ids in the tables index it)

    def band_keys(self, sigs: np.ndarray) -> np.ndarray:
        """(n, bands) uint64 keys: an FNV-style 64-bit hash of each band's `rows` signature values."""
        keys = np.zeros((len(sigs), self.bands), dtype=np.uint64)
        for k in range(self.rows):
            cols = sigs[:, k: self.bands * self.rows: self.rows].astype(np.uint64)  # value k of every band
            keys = (keys ^ cols) * np.uint64(0x100000001B3)
        return keys

    def add_signatures(self, sigs: np.ndarray) -> list[bool]:
        """For each signature in order: True if it near-duplicates a kept one (dropped), else it is kept."""
        keys = self.band_keys(sigs)
        # Only a signature sharing a band key with another of this batch or with a kept one can have a
        # candidate or be one; the rest (nearly all, in a corpus with few duplicates) are kept in bulk below.
        # (A key shared across two different bands only sends a signature through the exact loop: harmless.)
        shared = occurs_twice(keys.ravel()).reshape(keys.shape).any(axis=1)
        if self.kept:
            shared |= [any(key in table for table, key in zip(self.tables, row)) for row in keys.tolist()]
        flags = np.zeros(len(sigs), dtype=bool)
        for j in np.flatnonzero(shared):  # in order: what was kept before decides
            row = keys[j].tolist()
            candidates = {i for table, key in zip(self.tables, row) for i in table.get(key, ())}
            flags[j] = any(np.count_nonzero(self.kept[i] == sigs[j]) >= self.need for i in candidates)
            if not flags[j]:
                for table, key in zip(self.tables, row):
                    table.setdefault(key, []).append(len(self.kept))
                self.kept.append(sigs[j])
        alone = np.flatnonzero(~shared)
        ids = range(len(self.kept), len(self.kept) + len(alone))
        for table, col in zip(self.tables, keys[alone].T.tolist()):
            table.update(zip(col, ([i] for i in ids)))
        self.kept.extend(sigs[alone])
        return flags.tolist()

    def add_batch(self, texts: Sequence[str]) -> list[bool]:
        """For each text in order: True if it near-duplicates a text kept before it (it is then dropped)."""
        return self.add_signatures(self.hasher.signatures(texts))

    def seen(self, text: str) -> bool:
        return self.add_batch([text])[0]


def occurs_twice(values: np.ndarray) -> np.ndarray:
    """(n,) bool: does values[i] occur more than once? One argsort (2x faster than np.unique's inverse)."""
    order = np.argsort(values)
    ordered = values[order]
    same = ordered[1:] == ordered[:-1]  # equal to its sorted neighbour
    twice = np.zeros(len(values), dtype=bool)
    twice[1:] = same
    twice[:-1] |= same
    out = np.empty_like(twice)
    out[order] = twice
    return out


def near_duplicates(texts: Iterable[str], threshold: float = 0.8, num_perm: int = 128) -> list[int]:
    """Indices of texts that near-duplicate an earlier kept text (the ones dedup removes)."""
    flags = NearDedup(threshold, num_perm).add_batch(list(texts))
    return [i for i, dup in enumerate(flags) if dup]


def exact_jaccard(a: str, b: str, k: int = SHINGLE) -> float:
    """Exact Jaccard similarity of two texts' character k-gram sets (the reference MinHash estimates)."""
    sa, sb = (_shingle_set(t, k) for t in (a, b))
    return len(sa & sb) / len(sa | sb)


def _shingle_set(text: str, k: int) -> set[bytes]:
    blob = normalise(text).encode("utf-8").ljust(k, b"\0")
    return {blob[i:i + k] for i in range(len(blob) - k + 1)}

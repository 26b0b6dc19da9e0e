"""Exact and near-duplicate detection.

Exact: a 128-bit BLAKE2 hash of the normalised text (NFKC, lower case, whitespace collapsed).
Near: MinHash signatures over character 5-grams of the normalised text, indexed by datasketch's
MinHashLSH (banding tuned for recall); an LSH candidate counts as a duplicate only if its estimated Jaccard similarity is >= the
threshold. Character shingles (not word 5-grams) keep a few changed words from breaking the match: one
changed word alters ~len(word)+4 of a document's shingles, where it would alter 5 word 5-grams.

Signatures are computed in numpy for a whole batch of documents at once (no Python loop per shingle):
  bytes -> 5-byte windows -> 64-bit multiplicative hash -> murmur3 fmix32 -> (a_k * h + b_k) mod 2^32 for
  k in num_perm permutations (odd a_k: a bijection) -> min over each document's windows.
This is datasketch's "affine32" scheme; the values are wrapped as LeanMinHash for MinHashLSH.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np

SHINGLE = 5  # characters per shingle
_WS = re.compile(r"\s+")


def normalise(text: str) -> str:
    """NFKC, lower case, runs of whitespace collapsed to one space, stripped."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


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
        rng = np.random.RandomState(seed)
        self.num_perm, self.seed, self.shingle = num_perm, seed, shingle
        self.a = (rng.randint(0, 1 << 31, num_perm, dtype=np.uint64) * 2 + 1).astype(np.uint32)  # odd
        self.b = rng.randint(0, 1 << 32, num_perm, dtype=np.uint64).astype(np.uint32)

    def shingle_hashes(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """All documents' shingle hashes, concatenated (S,) uint32, and each document's first index (n,)."""
        k = self.shingle
        # Pad short texts to one full shingle so every document has at least one window.
        blobs = [normalise(t).encode("utf-8").ljust(k, b"\0") for t in texts]
        lengths = np.array([len(b) for b in blobs], dtype=np.int64)
        buf = np.frombuffer(b"".join(blobs), dtype=np.uint8).astype(np.uint64)
        windows = np.lib.stride_tricks.sliding_window_view(buf, k)  # (len(buf)-k+1, k)
        word = (windows << (np.arange(k, dtype=np.uint64) * np.uint64(8))).sum(axis=1, dtype=np.uint64)
        # Keep windows that lie inside one document: doc d owns starts [off_d, off_d + len_d - k].
        offsets = np.cumsum(lengths) - lengths
        n_win = lengths - k + 1
        doc = np.repeat(np.arange(len(blobs)), lengths)[: len(word)]  # owner of each window start
        starts = np.flatnonzero(np.arange(len(word)) - offsets[doc] < n_win[doc])
        h64 = word[starts] * np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: high bits mix all input bits
        h = _fmix32((h64 >> np.uint64(32)).astype(np.uint32))
        first = np.cumsum(n_win) - n_win
        return h, first

    def signatures(self, texts: Sequence[str], batch_shingles: int = 1 << 22) -> np.ndarray:
        """(len(texts), num_perm) uint32 MinHash signatures, computed batch by batch to bound memory
        at a few times batch_shingles * 8 bytes."""
        out = np.empty((len(texts), self.num_perm), dtype=np.uint32)
        i = 0
        while i < len(texts):
            j, size = i, 0
            while j < len(texts) and (j == i or size + len(texts[j]) <= batch_shingles):
                size += len(texts[j])
                j += 1
            h, first = self.shingle_hashes(texts[i:j])
            # One permutation at a time keeps each pass contiguous: (S,) -> min per document (n,).
            for p in range(self.num_perm):
                out[i:j, p] = np.minimum.reduceat(h * self.a[p] + self.b[p], first)
            i = j
        return out


class NearDedup:
    """Streaming near-duplicate detector: `seen(text)` says whether a near-duplicate was added before;
    if not, the text is added. `add_batch` does the same for many texts with batched signatures."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, seed: int = 1):
        from datasketch import MinHashLSH

        self.threshold = threshold
        self.hasher = MinHasher(num_perm, seed)
        # Weight false negatives 9x false positives when choosing bands x rows (14 x 9 at 0.8): LSH's
        # false candidates are cheap, the signature check below drops them; a missed pair is lost for good.
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))
        self.signatures: list[np.ndarray] = []

    def _check_and_add(self, sig: np.ndarray) -> int | None:
        """The index of a kept near-duplicate of `sig`, or None (then `sig` is indexed as kept)."""
        from datasketch import LeanMinHash

        m = LeanMinHash(seed=self.hasher.seed, hashvalues=sig, scheme="affine32")
        for key in self.lsh.query(m):
            # LSH banding has false candidates: confirm with the signature's Jaccard estimate.
            if np.count_nonzero(self.signatures[key] == sig) / len(sig) >= self.threshold:
                return key
        self.lsh.insert(len(self.signatures), m, check_duplication=False)
        self.signatures.append(sig)
        return None

    def seen(self, text: str) -> bool:
        return self._check_and_add(self.hasher.signatures([text])[0]) is not None

    def add_batch(self, texts: Sequence[str]) -> list[bool]:
        """For each text in order: True if it near-duplicates a text kept before it (it is then dropped)."""
        return [self._check_and_add(sig) is not None for sig in self.hasher.signatures(texts)]


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

"""Quality filters against plain-Python references, switchability, and near-dedup recall / false positives."""

import random
from collections import Counter

import numpy as np
import pytest

from tunelab.data.config import FilterConfig
from tunelab.data.corpus import local_corpus
from tunelab.data.dedup import MinHasher, exact_jaccard, near_duplicates, normalise
from tunelab.data.filters import (
    QualityFilter,
    alnum_ratio,
    repeated_line_ratio,
    repeated_ngram_ratio,
    symbol_ratio,
    truncated_response,
)

SAMPLES = [
    "Plain prose, with commas; and a question?",
    "def f(x):\n    return x ** 2  # square\n",
    "Ünïcödé letters ßtay letters — and “quotes”.",
    "@@@ ### $$$ %%% ^^^",
    "   ",
    "a a a a a a a a a a b c d e f a a a a a",
]


def _ref_counts(text):
    nonspace = [c for c in text if not c.isspace()]
    alnum = [c for c in nonspace if c.isalnum()]
    symbols = [c for c in nonspace if ord(c) < 128 and not c.isalnum() and c not in ".,;:!?'\"()-"]
    return len(nonspace), len(alnum), len(symbols)


def _ref_ngram_ratio(text, n=5):
    import re

    words = re.findall(r"\w+", text)
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    covered = set()
    for i, g in enumerate(grams):
        if counts[g] > 1:
            covered.update(range(i, i + n))
    total = sum(map(len, words))
    return sum(len(words[i]) for i in covered) / total if total and len(words) >= n else 0.0


@pytest.mark.parametrize("text", SAMPLES)
def test_ratios_match_plain_python(text):
    nonspace, alnum, symbols = _ref_counts(text)
    # Non-ASCII non-letters (— “ ”) count as letters in ours: the reference counts them as neither.
    non_ascii_punct = sum(1 for c in text if ord(c) > 127 and not c.isalnum() and not c.isspace())
    assert alnum_ratio(text) == pytest.approx((alnum + non_ascii_punct) / nonspace if nonspace else 0.0, abs=1e-12)
    assert symbol_ratio(text) == pytest.approx(symbols / nonspace if nonspace else 0.0, abs=1e-12)
    assert repeated_ngram_ratio(text) == pytest.approx(_ref_ngram_ratio(text), abs=1e-12)


def test_ratios_on_real_text_match_reference():
    for r in local_corpus("prose", max_docs=40):
        assert repeated_ngram_ratio(r["text"]) == pytest.approx(_ref_ngram_ratio(r["text"]), abs=1e-12)


def test_repeated_line_ratio():
    assert repeated_line_ratio("a\nbb\na\n\n  bb  \nccc") == pytest.approx((1 + 2) / (1 + 2 + 1 + 2 + 3))
    assert repeated_line_ratio("") == 0.0


GOOD = "The quick brown fox jumps over the lazy dog near the quiet river bank today."
BAD = {
    "min_chars": "too short",
    "symbol_ratio": "{{{ [[[ ]]] }}} <<< >>> ### @@@ ~~~ %%% word",
    "alnum_ratio": "... ... ,,, ;;; !!! ??? --- ... word ok",
    "repeated_lines": "buy now\nbuy now\nbuy now\nbuy now\nthe end of it",
    "repeated_ngrams": "click here to buy cheap pills " * 6,
}


def test_each_filter_removes_its_case_and_can_be_switched_off():
    qf = QualityFilter(FilterConfig())
    kept = list(qf(list(BAD.values()) + [GOOD, GOOD.upper()], lambda t: t))
    assert kept == [GOOD]
    rep = qf.report
    assert {name: s.removed for name, s in rep.stats.items()} == {**{k: 1 for k in BAD}, "exact_dedup": 1}
    assert rep.stats["symbol_ratio"].examples[0].startswith("'{{{")
    assert "exact_dedup" in rep.summary()
    off = dict(min_chars=0, max_symbol_ratio=None, min_alnum_ratio=None, max_repeated_line_ratio=None,
               max_repeated_ngram_ratio=None, exact_dedup=False)
    assert len(list(QualityFilter(FilterConfig(**off))(list(BAD.values()) + [GOOD, GOOD], lambda t: t))) == 7
    assert len(list(QualityFilter(FilterConfig(enabled=False))(list(BAD.values()), lambda t: t))) == 5


def test_truncated_response():
    assert truncated_response("Here is the code:\n```python\nx = 1\n")
    assert truncated_response("The answer depends on,")
    assert not truncated_response("Use `sorted(xs)`.")
    assert not truncated_response("```python\nx = 1\n```")


def test_minhash_estimates_exact_jaccard():
    texts = [r["text"][:400] for r in local_corpus("prose", max_docs=30)]
    rng = random.Random(0)
    pairs = [(t, " ".join(w if rng.random() > p else "xyz" for w in t.split())) for t in texts for p in (0.05, 0.3)]
    sigs = MinHasher(num_perm=256).signatures([x for p in pairs for x in p])
    est = (sigs[0::2] == sigs[1::2]).mean(axis=1)
    exact = np.array([exact_jaccard(a, b) for a, b in pairs])
    # 256 permutations: std of the estimate <= 0.5/sqrt(256) = 0.031; allow ~4 sigma per pair, 1 sigma mean.
    assert np.abs(est - exact).max() < 0.13
    assert abs((est - exact).mean()) < 0.03


def _distinct_docs(n, rng):
    words = sorted({w for r in local_corpus("prose") for w in normalise(r["text"]).split() if w.isalpha()})
    return [" ".join(rng.choice(words) for _ in range(rng.randint(40, 80))) for _ in range(n)]


def test_near_dedup_recall_and_false_positives():
    rng = random.Random(0)
    docs = _distinct_docs(2000, rng)
    planted = []
    for i in range(300):  # a few words (2-4) changed in a copy of an existing document
        words = docs[i].split()
        for k in rng.sample(range(len(words)), rng.randint(2, 4)):
            words[k] = rng.choice(["alpha", "omega", "zeta", "quux", "thing"])
        planted.append(" ".join(words))
    removed = set(near_duplicates(docs + planted, threshold=0.8))
    recall = len(removed & set(range(2000, 2300))) / 300
    false_pos = len(removed & set(range(2000))) / 2000
    print(f"near-dedup: recall {recall:.3f}, false positives {false_pos:.4f}")
    assert recall >= 0.9, recall
    assert false_pos <= 0.01, false_pos
    # The planted copies really are near-duplicates by the exact measure the threshold refers to.
    assert np.median([exact_jaccard(docs[i], planted[i]) for i in range(300)]) > 0.8


def test_near_dedup_in_filter_reports_examples():
    docs = _distinct_docs(50, random.Random(1))
    near = docs[0].replace(docs[0].split()[3], "changed", 1)
    qf = QualityFilter(FilterConfig(near_dedup=True, exact_dedup=False))
    kept = list(qf(docs + [near], lambda t: t))
    assert len(kept) == 50 and qf.report.stats["near_dedup"].removed == 1


def test_banding_equals_datasketch_minhashlsh():
    """Our dict band tables give exactly MinHashLSH's result on the same signatures and (bands, rows)."""
    from datasketch import LeanMinHash, MinHashLSH

    from tunelab.data.dedup import NearDedup

    rng = random.Random(2)
    docs = _distinct_docs(600, rng)
    docs += [" ".join(w if rng.random() > 0.1 else "zz" for w in d.split()) for d in docs[:200]]
    ours = NearDedup(0.8)
    sigs = ours.hasher.signatures(docs)
    flags = ours.add_signatures(sigs)
    lsh = MinHashLSH(threshold=0.8, num_perm=128, weights=(0.1, 0.9))
    kept, ref = {}, []
    for j, sig in enumerate(sigs):
        m = LeanMinHash(seed=1, hashvalues=sig, scheme="affine32")
        dup = any(np.mean(kept[i] == sig) >= 0.8 for i in lsh.query(m))
        if not dup:
            lsh.insert(j, m)
            kept[j] = sig
        ref.append(dup)
    assert flags == ref and 0 < sum(ref) < 200


def test_near_dedup_in_pieces_equals_one_batch():
    """Signatures that share no band key are kept in bulk, the rest one by one: any batching (down to one text
    at a time, as the quality filter streams) must give the same flags as one batch."""
    from tunelab.data.dedup import NearDedup

    rng = random.Random(3)
    docs = _distinct_docs(300, rng)
    docs += [" ".join(w if rng.random() > 0.1 else "zz" for w in d.split()) for d in docs[:100]] + docs[:20]
    rng.shuffle(docs)
    whole = NearDedup(0.8).add_batch(docs)
    nd = NearDedup(0.8)
    pieces = [nd.seen(t) for t in docs[:60]] + nd.add_batch(docs[60:250]) + nd.add_batch(docs[250:])
    assert pieces == whole and 20 <= sum(whole) < 120

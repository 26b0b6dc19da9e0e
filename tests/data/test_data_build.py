"""Mixtures by tokens, epochs, packing invariants, and build_datasets' contract for the trainer."""

import json
import random

import pytest

from tunelab.data import DataConfig, FilterConfig, SourceConfig, build, build_datasets
from tunelab.data.corpus import local_corpus
from tunelab.data.filters import QualityFilter
from tunelab.data.mixture import SourceStream, mix
from tunelab.data.packing import IGNORE, pack, padded


@pytest.fixture(scope="module")
def three_sources(tmp_path_factory):
    """Code, prose and Q&A as JSONL files (the Q&A file is small: the mixture must repeat it)."""
    d = tmp_path_factory.mktemp("mix")
    paths = {}
    for kind, n in [("code", 120), ("prose", None), ("qa", 300)]:
        paths[kind] = d / f"{kind}.jsonl"
        paths[kind].write_text("".join(json.dumps(r) + "\n" for r in local_corpus(kind, max_docs=n)))
    return paths


def _sources(paths, weights, epochs=(None, None, None)):
    return [SourceConfig(name=k, path=str(p), kind=k, weight=w, epochs=e)
            for (k, p), w, e in zip(paths.items(), weights, epochs)]


def test_mixture_token_shares_match_weights(three_sources, tiny_tokenizer):
    srcs = _sources(three_sources, [0.5, 0.3, 0.2])
    encode = lambda texts: tiny_tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    qf = QualityFilter(FilterConfig())
    streams = [SourceStream(s, encode, tiny_tokenizer.eos_token_id, 256, qf, seed=0, max_passes=s.epochs) for s in srcs]
    got = [0, 0, 0]
    for i, ids in mix(streams, max_tokens=220_000):
        got[i] += len(ids)  # counted here, independently of the streams' own stats
    assert sum(got) == 220_000
    shares = [g / sum(got) for g in got]
    for share, asked in zip(shares, [0.5, 0.3, 0.2]):
        assert abs(share - asked) < 0.02, shares
    assert [s.stats.tokens for s in streams] == got
    assert streams[2].stats.passes_started > 1  # the small Q&A source was repeated to keep its share


def test_epochs_cap_a_source_and_the_rest_share_its_part(three_sources, tiny_tokenizer):
    srcs = _sources(three_sources, [0.5, 0.3, 0.2], epochs=(None, None, 1.0))
    cfg = DataConfig(task="pretrain", sources=srcs, max_tokens=100_000, eval_fraction=0.0)
    rep = build(cfg, tiny_tokenizer, 256).report
    code, prose, qa = rep.sources
    assert qa.passes_started == 1 and qa.tokens < 0.2 * 100_000
    assert code.tokens + prose.tokens + qa.tokens == 100_000
    # Without max_tokens the mixture stops when a source runs out (epochs None counts as one pass).
    cfg = DataConfig(task="pretrain", sources=srcs, eval_fraction=0.0)
    rep = build(cfg, tiny_tokenizer, 256).report
    assert max(s.passes_started for s in rep.sources) == 1
    asked = [a for a, _ in rep.shares()]
    got = [g for _, g in rep.shares()]
    assert max(abs(a - g) for a, g in zip(asked, got)) < 0.02


def _docs(rng, n, vocab=500):
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 300))] for _ in range(n)]


def test_packed_rows_reset_positions_and_mask_doc_starts():
    docs = _docs(random.Random(0), 40)
    rows = list(pack(((d, d) for d in docs), seq_len=128, pad_id=0))
    assert all(len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"]) == 128 for r in rows)
    flat = [t for r in rows for t in r["input_ids"]]
    total = sum(map(len, docs))
    assert flat[:total] == [t for d in docs for t in d] and set(flat[total:]) <= {0}
    # Reference: where each document starts in the flat stream.
    starts, at = set(), 0
    for d in docs:
        starts.add(at)
        at += len(d)
    for k, t in enumerate(flat[:total]):
        row, col = divmod(k, 128)
        r = rows[row]
        if k in starts:
            assert r["position_ids"][col] == 0 and r["labels"][col] == IGNORE
        else:
            assert r["labels"][col] == t
            assert r["position_ids"][col] == (0 if col == 0 else r["position_ids"][col - 1] + 1)
    assert all(lab == IGNORE for r in rows for lab, t in zip(r["labels"][total % 128:], []))


def test_sft_packing_never_splits_an_example_and_padded_mode():
    rng = random.Random(1)
    docs = [(d, [IGNORE] * (len(d) // 2) + d[len(d) // 2:]) for d in _docs(rng, 30) if len(d) <= 128]
    rows = list(pack(docs, seq_len=128, pad_id=0, split_docs=False))
    segments = []
    for r in rows:
        pos = r["position_ids"]
        bounds = [i for i, p in enumerate(pos) if p == 0] + [128]
        segments += [r["input_ids"][a:b] for a, b in zip(bounds, bounds[1:])]
    real = [s for s in segments if any(s)]
    assert real == [d for d, _ in docs]  # every example whole, in order (padding is its own segment)
    rows = list(padded(docs, seq_len=128))
    assert [r["input_ids"] for r in rows] == [d for d, _ in docs]
    assert all(r["position_ids"] == list(range(len(r["input_ids"]))) for r in rows)


def test_build_datasets_sft_contract(tmp_path, bundled_tokenizer, capsys):
    recs = [{"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."} for a in range(12) for b in range(5)]
    recs[3] = {"prompt": "Broken?", "response": ""}
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "eval.jsonl").write_text(json.dumps(recs[10]) + "\n")
    cfg = DataConfig(task="sft", sources=[SourceConfig(name="sums", path=str(tmp_path / "sft.jsonl"), kind="qa")],
                     eval_path=str(tmp_path / "eval.jsonl"), packing="padded")
    train, eval_ = build_datasets(cfg, bundled_tokenizer, seq_len=64)
    out = capsys.readouterr().out
    assert "empty_response" in out and "eval_overlap" in out
    assert len(train) == 58 and len(eval_) == 1
    for row in train + eval_:
        assert set(row) == {"input_ids", "labels", "position_ids"} and len(row["input_ids"]) <= 64
        text = bundled_tokenizer.decode([t for t in row["labels"] if t != IGNORE])
        assert text.endswith(" is " + text.split(" is ")[-1]) and text.endswith("<|im_end|>")
    packed, _ = build_datasets(cfg.model_copy(update={"packing": "packed"}), bundled_tokenizer, 64, verbose=False)
    assert all(len(r["input_ids"]) == 64 for r in packed)
    n_labels = lambda rows: sum(t != IGNORE for r in rows for t in r["labels"])  # noqa: E731
    assert n_labels(packed) == n_labels(train)


def test_batch_encoder_equals_tokenizer_call(bundled_tokenizer, tiny_tokenizer):
    from tunelab.data.pipeline import batch_encoder

    texts = [r["text"] for r in local_corpus("prose", max_docs=20)] + ["<|im_end|> special, ünïcode\n\n  x"]
    for tok in (bundled_tokenizer, tiny_tokenizer):
        assert batch_encoder(tok)(texts) == tok(texts, add_special_tokens=False)["input_ids"]


def test_build_datasets_pretrain_contract(tiny_tokenizer):
    cfg = DataConfig(task="pretrain", sources=[SourceConfig(name="prose", path="local:prose")], max_tokens=20_000,
                     eval_fraction=0.1, packing="packed")
    built = build(cfg, tiny_tokenizer, 128)
    assert sum(len(r["input_ids"]) for r in built.train) == -(-20_000 // 128) * 128
    assert all(len(r["input_ids"]) == 128 for r in built.train + built.eval) and built.eval
    again = build(cfg, tiny_tokenizer, 128)
    assert again.train == built.train  # deterministic for a seed
    other = build(cfg, tiny_tokenizer, 128, seed=1)
    assert other.train != built.train


def test_sft_response_lost_to_max_length_is_refused(tmp_path, tiny_tokenizer):
    prompt = " ".join(f"word{i}" for i in range(60))
    (tmp_path / "a.jsonl").write_text(json.dumps({"prompt": prompt, "response": "ok."}) + "\n")
    cfg = DataConfig(task="sft", sources=[SourceConfig(name="a", path=str(tmp_path / "a.jsonl"))], eval_fraction=0)
    from tunelab.errors import DataError, TunelabError

    with pytest.raises(DataError, match=r"a.jsonl:1: no response token survives"):
        build(cfg, tiny_tokenizer, 32)
    with pytest.raises(TunelabError, match="no training rows.*1 bad rows were skipped.*no response token"):
        build(cfg.model_copy(update={"skip_bad_rows": True}), tiny_tokenizer, 32)

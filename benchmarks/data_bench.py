"""Data-path throughput, side by side in one run (docs/data.md quotes it).

1. tokenize + filter + pack, MB of input text per second on ONE core (the Rust tokenizer's thread pool is
   pinned to one thread), with the bundled SmolLM2 tokenizer over local-corpus text (code, prose, Q&A);
   each stage timed alone, then the whole pretraining `build()` end to end.
2. near-dedup of 100k short documents: wall time, our batched numpy MinHash + datasketch MinHashLSH;
   beside it datasketch's own per-document MinHash (SHA-1 per shingle) on a slice, as the reference.

Run: python benchmarks/data_bench.py [--docs 100000] [--repeats 3]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before tokenizers starts its pool: measure one core
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import argparse  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def throughput(repeats: int) -> None:
    from transformers import AutoTokenizer

    from tunelab.data import DataConfig, FilterConfig, SourceConfig, build
    from tunelab.data.corpus import local_corpus
    from tunelab.data.filters import QualityFilter
    from tunelab.data.packing import pack
    from tunelab.models.bundled import tokenizer_dir

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    texts = ([r["text"] for r in local_corpus("code", max_docs=150)] + [r["text"] for r in local_corpus("prose")]
             + [r["text"] for r in local_corpus("qa", max_docs=800)])
    random.Random(0).shuffle(texts)
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    print(f"text: {len(texts)} documents, {mb:.2f} MB (local corpus: code, prose, qa)")

    def tokenize():
        return tok(texts, add_special_tokens=False)["input_ids"]

    def filt():
        qf = QualityFilter(FilterConfig())
        return [t for t in texts if qf.keep(t)]

    t_tok, ids = _median_time(tokenize, repeats)
    t_filt, _ = _median_time(filt, repeats)
    t_pack, rows = _median_time(lambda: list(pack(((d, d) for d in ids), 2048, 0)), repeats)
    total = t_tok + t_filt + t_pack
    print(f"  tokenize        {t_tok:6.2f} s  {mb / t_tok:6.2f} MB/s")
    print(f"  filter (all on) {t_filt:6.2f} s  {mb / t_filt:6.2f} MB/s")
    print(f"  pack 2048       {t_pack:6.2f} s  {mb / t_pack:6.2f} MB/s")
    print(f"  stages summed   {total:6.2f} s  {mb / total:6.2f} MB/s per core")

    tokens = sum(map(len, ids))
    cfg = DataConfig(task="pretrain", max_tokens=tokens, eval_fraction=0.0, sources=[
        SourceConfig(name="code", path="local:code", kind="code", weight=0.6),
        SourceConfig(name="prose", path="local:prose", kind="web", weight=0.4)])
    # End to end: read, filter (every text read ahead in the shuffle buffer), tokenize, mix, pack.
    t = time.perf_counter()
    built = build(cfg, tok, 2048)
    t_build = time.perf_counter() - t
    drawn = built.report.train_tokens
    print(f"  build() end to end: {drawn} tokens in {t_build:.2f} s = {drawn / t_build / 1e3:.0f}k tokens/s "
          f"(~{drawn * mb / tokens / t_build:.2f} MB/s at this text's {mb * 1e6 / tokens:.2f} bytes/token)")


def near_dedup(n_docs: int, repeats: int) -> None:
    from datasketch import MinHash

    from tunelab.data.corpus import local_corpus
    from tunelab.data.dedup import SHINGLE, MinHasher, near_duplicates, normalise

    rng = random.Random(0)
    words = sorted({w for r in local_corpus("prose") for w in normalise(r["text"]).split() if w.isalpha()})
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) for _ in range(n_docs)]
    n_near = n_docs // 10
    for i in rng.sample(range(n_docs), n_near):  # plant near-duplicates: one word changed
        w = docs[i - 1].split()
        w[rng.randrange(len(w))] = "changed"
        docs[i] = " ".join(w)
    chars = sum(map(len, docs))
    print(f"near-dedup: {n_docs} documents of 20-60 words ({chars / n_docs:.0f} chars avg), {n_near} planted")
    t_sig1, _ = _median_time(lambda: MinHasher().signatures(docs, workers=1), repeats)
    t_sig, _ = _median_time(lambda: MinHasher().signatures(docs, workers=2), repeats)
    print(f"  ours: signatures on 1 thread {t_sig1:.2f} s, on 2 threads {t_sig:.2f} s")
    t_all, removed = _median_time(lambda: near_duplicates(docs, 0.8), repeats)
    print(f"  ours: signatures (2 threads) + LSH bands {t_all:.2f} s wall; removed {len(removed)} (planted {n_near})")
    k = 5000
    def reference():
        for d in docs[:k]:
            b = normalise(d).encode()
            MinHash(num_perm=128).update_batch([b[i:i + SHINGLE] for i in range(len(b) - SHINGLE + 1)])
    t_ref, _ = _median_time(reference, 1)
    print(f"  datasketch MinHash.update_batch (SHA-1 per shingle), {k} docs: {t_ref:.2f} s "
          f"-> {t_ref * n_docs / k:.1f} s for {n_docs} (signatures only); ours {t_sig:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"cores visible: {os.cpu_count()}, tokenizer threads: {os.environ['RAYON_NUM_THREADS']}, "
          f"load average at start: {os.getloadavg()[0]:.1f} (other jobs share this machine)")
    throughput(args.repeats)
    near_dedup(args.docs, args.repeats)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

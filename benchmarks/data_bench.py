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


def _median_times(fn, repeats):
    """Median (wall, CPU) seconds over repeats. CPU seconds of this process are core-seconds: with the
    tokenizer on one thread they measure throughput per core even while other jobs load the machine."""
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        _median_times.last = fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def throughput(repeats: int) -> None:
    from transformers import AutoTokenizer

    from tunelab.data import DataConfig, FilterConfig, SourceConfig, build
    from tunelab.data.corpus import local_corpus
    from tunelab.data.filters import QualityFilter
    from tunelab.data.packing import pack
    from tunelab.data.pipeline import batch_encoder
    from tunelab.models.bundled import tokenizer_dir

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    texts = ([r["text"] for r in local_corpus("code", max_docs=150)] + [r["text"] for r in local_corpus("prose")]
             + [r["text"] for r in local_corpus("qa", max_docs=800)])
    random.Random(0).shuffle(texts)
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    print(f"text: {len(texts)} documents, {mb:.2f} MB (local corpus: code, prose, qa)")

    encode = batch_encoder(tok)

    def tokenize():
        return encode(texts)

    def filt():
        qf = QualityFilter(FilterConfig())
        return [t for t in texts if qf.keep(t)]

    stages = {}
    for name, fn in [("tokenize", tokenize), ("filter (all on)", filt),
                     ("pack 2048", lambda: list(pack(((d, d) for d in ids), 2048, 0)))]:
        stages[name] = _median_times(fn, repeats)
        if name == "tokenize":
            ids = _median_times.last
    print(f"  {'stage':<16} {'wall s':>7} {'MB/s':>6} {'CPU s':>7} {'MB per CPU-s':>12}")
    for name, (wall, cpu) in stages.items():
        print(f"  {name:<16} {wall:7.2f} {mb / wall:6.2f} {cpu:7.2f} {mb / cpu:12.2f}")
    wall, cpu = (sum(v[i] for v in stages.values()) for i in (0, 1))
    print(f"  {'all three':<16} {wall:7.2f} {mb / wall:6.2f} {cpu:7.2f} {mb / cpu:12.2f}   <- per core: MB per CPU-second")

    tokens = sum(map(len, ids))
    cfg = DataConfig(task="pretrain", max_tokens=tokens, eval_fraction=0.0, sources=[
        SourceConfig(name="code", path="local:code", kind="code", weight=0.6),
        SourceConfig(name="prose", path="local:prose", kind="web", weight=0.4)])
    # End to end: read, filter (every text read ahead in the shuffle buffer), tokenize, mix, pack.
    t_build, c_build = _median_times(lambda: build(cfg, tok, 2048), 1)
    drawn = _median_times.last.report.train_tokens
    mb_drawn = drawn * mb / tokens  # at this text's bytes per token
    print(f"  build() end to end: {drawn} tokens (~{mb_drawn:.2f} MB) in {t_build:.2f} s wall, {c_build:.2f} CPU s "
          f"= {mb_drawn / c_build:.2f} MB per CPU-second")


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
    t_sig1, c_sig1 = _median_times(lambda: MinHasher().signatures(docs, workers=1), repeats)
    t_sig, c_sig = _median_times(lambda: MinHasher().signatures(docs, workers=2), repeats)
    print(f"  ours: signatures on 1 thread {t_sig1:.2f} s wall ({c_sig1:.2f} CPU s), "
          f"on 2 threads {t_sig:.2f} s wall ({c_sig:.2f} CPU s)")
    t_all, c_all = _median_times(lambda: near_duplicates(docs, 0.8), repeats)
    removed = _median_times.last
    print(f"  ours: signatures (2 threads) + LSH bands {t_all:.2f} s wall, {c_all:.2f} CPU s; "
          f"removed {len(removed)} (planted {n_near})")
    k = 5000
    def reference():
        for d in docs[:k]:
            b = normalise(d).encode()
            MinHash(num_perm=128).update_batch([b[i:i + SHINGLE] for i in range(len(b) - SHINGLE + 1)])
    t_ref, c_ref = _median_times(reference, 1)
    print(f"  datasketch MinHash.update_batch (SHA-1 per shingle), {k} docs: {t_ref:.2f} s wall ({c_ref:.2f} CPU s) "
          f"-> {c_ref * n_docs / k:.1f} CPU s for {n_docs} (signatures only); ours {c_sig1:.2f} CPU s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", choices=["throughput", "dedup"], default=None)
    args = ap.parse_args()
    print(f"cores visible: {os.cpu_count()}, tokenizer threads: {os.environ['RAYON_NUM_THREADS']}, "
          f"load average at start: {os.getloadavg()[0]:.1f} (other jobs share this machine)")
    if args.only != "dedup":
        throughput(args.repeats)
    if args.only != "throughput":
        near_dedup(args.docs, args.repeats)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

"""`tunelab data prepare` throughput, and what a prepared set saves when a run resumes (issue 25).

1. prepare (read, filter, format, tokenize, mask, pack, write the shards) into a fresh folder with 1 and
   with 2 tokenizing processes (data.num_proc): tokens of the train rows per second of wall time, and a
   check that both give the same rows;
2. the data step of a resumed run's start-up: before (every launch rebuilt the rows: pipeline.build) and
   after (the manifest matches: hash the sources, memory-map the shards), with a check that the rows match.

Run: python benchmarks/prepare_bench.py [--task sft|pretrain] [--source local:qa] [--seq-len 512]
(on a shared machine, wrap it in benchmarks/quiet.py, or the timings say nothing).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def _timed(fn):
    t = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=["sft", "pretrain"], default="sft")
    ap.add_argument("--source", default=None, help="default: local:qa (sft), local:code (pretrain)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=2_000_000, help="pretrain: tokens drawn")
    ap.add_argument("--procs", default="1,2", help="tokenizing processes to compare")
    ap.add_argument("--tokenizer", default=None, help="an HF tokenizer folder (default: the bundled SmolLM2's)")
    args = ap.parse_args()

    from tunelab.data import prepared
    from tunelab.data.cli import load_tokenizer
    from tunelab.data.config import DataConfig
    from tunelab.data.pipeline import build

    source = args.source or ("local:qa" if args.task == "sft" else "local:code")
    cfg = DataConfig(task=args.task, sources=[{"name": "src", "path": source}], packing="padded",
                     max_tokens=args.max_tokens if args.task == "pretrain" else None)
    tok = load_tokenizer(args.tokenizer)
    tmp = Path(tempfile.mkdtemp(prefix="prepare_bench-"))
    print(f"{args.task} from {source}, seq_len {args.seq_len}, tokenizer {tok.name_or_path}")

    # before: what every launch (and every resume) did until prepared data; also warms the source's caches
    before, t_before = _timed(lambda: build(cfg, tok, args.seq_len, 0))
    rows = {}
    for n in [int(p) for p in args.procs.split(",")]:
        folder = tmp / f"procs{n}"
        c = cfg.model_copy(update={"num_proc": n})
        (train, eval_), wall = _timed(lambda: prepared.load_or_build(c, tok, args.seq_len, 0, folder, verbose=False))
        labels = sum(t != -100 for r in train for t in r["labels"])
        tokens = sum(len(r["input_ids"]) for r in train)
        rows[n] = train
        print(f"  prepare, {n} process(es): {wall:7.2f} s wall, {tokens / wall:10.0f} tokens/s "
              f"({tokens} tokens in {len(train)} rows, {labels} with a label)")
    first = next(iter(rows.values()))
    print(f"  same rows for every process count: {all(r == first for r in rows.values())}")

    folder = tmp / f"procs{next(iter(rows))}"
    (after, _), t_after = _timed(lambda: prepared.load_or_build(cfg, tok, args.seq_len, 0, folder, verbose=False))
    print(f"  resumed run, data step: before (rebuilt every launch) {t_before:7.2f} s; after (manifest "
          f"matches, memory-mapped) {t_after:7.2f} s; same rows: {list(after) == before.train}")
    print(f"  (prepared folders under {tmp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

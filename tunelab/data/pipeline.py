"""From a DataConfig to training rows: read -> filter -> (mixture | SFT formatting) -> pack.

`build(cfg, tokenizer, seq_len)` returns a `Built` with train and eval rows and a `DataReport`;
`build_datasets(...)` is the trainer's entry point: it prints the report and returns (train, eval).
"""

from __future__ import annotations

import math
import multiprocessing
import random
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from tunelab.data import sft
from tunelab.data.config import DataConfig, SourceConfig
from tunelab.data.filters import FilterReport, QualityFilter, truncated_response
from tunelab.data.mixture import SourceStats, SourceStream, iter_texts, mix
from tunelab.data.packing import pack, padded
from tunelab.data.sources import iter_rows
from tunelab.errors import ConfigError, DataError, TunelabError


@dataclass
class DataReport:
    """What building did: per-source draws, what the filters removed, bad rows, cut examples."""

    task: str
    sources: list[SourceStats] = field(default_factory=list)
    filters: FilterReport = field(default_factory=FilterReport)
    skipped: list[DataError] = field(default_factory=list)  # bad rows skipped (skip_bad_rows=True)
    truncated: int = 0           # SFT examples cut by max length
    truncated_examples: list[str] = field(default_factory=list)
    train_rows: int = 0
    eval_rows: int = 0
    train_tokens: int = 0        # non-pad tokens in train rows
    labels: str = ""             # spans: counts per label

    def shares(self) -> list[tuple[float, float]]:
        """(asked, realised) token share per source."""
        wsum = sum(s.weight for s in self.sources) or 1.0
        tsum = sum(s.tokens for s in self.sources) or 1
        return [(s.weight / wsum, s.tokens / tsum) for s in self.sources]

    def to_dict(self) -> dict:
        """The report as JSON-ready numbers: per source the asked (planned) and realised token shares, per
        filter (dedup included) the records removed, and the truncation and bad-row counts."""
        return {"task": self.task, "train_rows": self.train_rows, "eval_rows": self.eval_rows,
                "train_tokens": self.train_tokens, "labels": self.labels,
                "sources": [{"name": s.name, "kind": s.kind, "docs": s.docs, "tokens": s.tokens, "passes": s.passes_started,
                             "share_planned": asked, "share_realised": got}
                            for s, (asked, got) in zip(self.sources, self.shares())],
                "filters": {"seen": self.filters.seen, "removed": self.filters.removed,
                            "by_filter": {k: {"removed": v.removed, "examples": v.examples}
                                          for k, v in self.filters.stats.items()}},
                "skipped_rows": len(self.skipped), "skipped_examples": [str(e) for e in self.skipped[:3]],
                "truncated": self.truncated, "truncated_examples": self.truncated_examples}

    def summary(self) -> str:
        lines = [f"data ({self.task}): {self.train_rows} train rows, {self.eval_rows} eval rows, "
                 f"{self.train_tokens} train tokens"]
        if self.labels:  # spans: no mixture and no filters, the label counts say what is there
            return "\n".join(lines + [f"  {self.labels}"])
        lines.append(f"  {'source':<16} {'kind':<6} {'docs':>8} {'tokens':>10} {'asked':>6} {'got':>6}  passes")
        for s, (asked, got) in zip(self.sources, self.shares()):
            lines.append(f"  {s.name:<16} {s.kind:<6} {s.docs:>8} {s.tokens:>10} {asked:>6.3f} {got:>6.3f}  {s.passes_started}")
        lines += ["  " + line for line in self.filters.summary().splitlines()]
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} bad rows, e.g. {self.skipped[0]}")
        if self.task in ("sft", "preference"):
            lines.append(f"  truncated to max length: {self.truncated} examples")
            lines += [f"      e.g. {e}" for e in self.truncated_examples]
        return "\n".join(lines)


@dataclass
class Built:
    train: list[dict]
    eval: list[dict]
    report: DataReport


def build_datasets(cfg: DataConfig, tokenizer, seq_len: int, seed: int | None = None,
                   verbose: bool = True) -> tuple[list[dict], list[dict]]:
    """Train and eval rows, each {"input_ids", "labels", "position_ids"} (lists of ints, labels -100 where
    no loss). Packed: every row has exactly seq_len tokens. Padded: one example per row, <= seq_len.
    Prints the report (filters, shares, truncations) unless verbose=False; `build` returns it instead."""
    built = build(cfg, tokenizer, seq_len, seed)
    if verbose:
        print(built.report.summary())
    return built.train, built.eval


def build(cfg: DataConfig, tokenizer, seq_len: int, seed: int | None = None) -> Built:
    """Like build_datasets, returning the rows together with the DataReport."""
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token: every document and response must end in one")
    seed = cfg.seed if seed is None else seed
    report = DataReport(cfg.task)
    if cfg.task == "spans":
        return _spans(cfg, tokenizer, seq_len, seed, report)
    if cfg.task == "preference":
        return _preference(cfg, tokenizer, seq_len, seed, report)
    qfilter = QualityFilter(cfg.filters)
    report.filters = qfilter.report
    make = _pretrain if cfg.task == "pretrain" else _sft
    with _pool(tokenizer, cfg.num_proc) as pool:
        train_docs, eval_docs = make(cfg, tokenizer, seq_len, seed, qfilter, report, pool)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if cfg.packing == "packed":
        rows = lambda docs: list(pack(docs, seq_len, pad_id, split_docs=cfg.task == "pretrain"))  # noqa: E731
    else:
        rows = lambda docs: list(padded(docs, seq_len))  # noqa: E731
    train, eval_ = rows(train_docs), rows(eval_docs)
    if not train:
        raise TunelabError(
            f"no training rows: filters removed {report.filters.removed} of {report.filters.seen} records and "
            f"{len(report.skipped)} bad rows were skipped" + (f" (e.g. {report.skipped[0]})" if report.skipped else "")
        )
    report.train_rows, report.eval_rows = len(train), len(eval_)
    report.train_tokens = sum(len(ids) for ids, _ in train_docs)
    return Built(train, eval_, report)


_worker_tokenizer = None  # in a pool's worker process: the tokenizer it was started with


def _init_worker(tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


@contextmanager
def _pool(tokenizer, num_proc: int):
    """`num_proc` worker processes holding the tokenizer, or None for num_proc=1. Work is handed out in order
    and results come back in order, so the rows are the same for any num_proc. Forked where the OS can (as
    `datasets.map(num_proc)` does): a spawned worker would re-run the launching script, which `tunelab`'s
    entry points do not guard; the workers only tokenize (no torch), so the threads a fork leaves behind are
    not used there."""
    if num_proc <= 1:
        yield None
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(num_proc, mp_context=ctx, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        yield pool


def _encode_texts(texts: list[str]) -> list[list[int]]:  # runs in a worker
    return batch_encoder(_worker_tokenizer)(texts)


def batch_encoder(tokenizer, pool: ProcessPoolExecutor | None = None):
    """texts -> token id lists, no special tokens added. A fast tokenizer's Rust `encode_batch_fast` (no
    offsets) gives the same ids as `tokenizer(texts)` for less CPU (data_bench.py); else `tokenizer(texts)`.
    With a pool, each call's texts are cut into one part per worker."""
    if pool is not None:
        n = pool._max_workers

        def encode(texts):
            parts = [texts[k::n] for k in range(n)]  # interleaved: equal work even when lengths trend
            out: list = [None] * len(texts)
            for k, ids in enumerate(pool.map(_encode_texts, parts)):
                out[k::n] = ids
            return out

        return encode
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return lambda texts: [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]


def _pretrain(cfg: DataConfig, tokenizer, seq_len, seed, qfilter, report, pool=None):
    """Draw the mixture; (ids, labels) documents for train and eval (labels = ids: plain LM loss)."""
    encode, eos = batch_encoder(tokenizer, pool), tokenizer.eos_token_id
    eval_fraction = 0.0 if cfg.eval_path else cfg.eval_fraction
    streams = [
        SourceStream(src, encode, eos, seq_len, qfilter, seed,
                     max_passes=src.epochs if cfg.max_tokens is not None else (src.epochs or 1.0),
                     eval_fraction=eval_fraction, skip_bad_rows=cfg.skip_bad_rows, skipped=report.skipped)
        for src in cfg.sources
    ]
    report.sources = [s.stats for s in streams]
    train = []
    with tqdm(total=cfg.max_tokens, unit="tok", desc="mixture", disable=None, leave=False) as bar:
        for _, ids in mix(streams, cfg.max_tokens):
            train.append((ids, ids))
            bar.update(len(ids))
    if cfg.eval_path:
        eval_src = SourceConfig(name="eval", path=cfg.eval_path, text_field=cfg.sources[0].text_field)
        eval_texts = list(iter_texts(eval_src, cfg.skip_bad_rows, report.skipped))
    else:
        eval_texts = [t for s in streams for t in s.eval_texts]
    eval_docs = []
    for ids in encode(eval_texts) if eval_texts else []:
        ids = ids + [eos]
        eval_docs += [(ids[k:k + seq_len],) * 2 for k in range(0, len(ids), seq_len)]
    return train, eval_docs


def _spans(cfg: DataConfig, tokenizer, seq_len: int, seed: int, report: DataReport) -> Built:
    """Span documents -> windows with BIO labels (tunelab.data.spans); no quality filters (they would drop
    documents whose spans are the point, e.g. symbol-heavy injections)."""
    from tunelab.data import spans

    train_docs, val_docs, test_docs = spans.split_docs(cfg, seed)
    labels = spans.label_list(cfg, train_docs + val_docs + test_docs)
    train = spans.rows(train_docs, tokenizer, labels, seq_len, cfg.stride)
    eval_ = spans.rows(val_docs, tokenizer, labels, seq_len, cfg.stride)
    if not train:
        raise TunelabError("data.task=spans: no training documents (all went to the eval split?)")
    report.train_rows, report.eval_rows = len(train), len(eval_)
    report.train_tokens = sum(len(r["input_ids"]) for r in train)
    report.labels = (f"labels {labels}; train {spans.label_counts(train_docs)}; validation "
                     f"{spans.label_counts(val_docs)}" + (f"; test {spans.label_counts(test_docs)}" if test_docs else ""))
    return Built(train, eval_, report)


def _preference(cfg: DataConfig, tokenizer, seq_len: int, seed: int, report: DataReport) -> Built:
    """Preference records of every source (tunelab.data.preference: pairs, or unpaired for KTO), each side
    at most seq_len tokens; split into train/eval as SFT records are; no quality filters (a rejected
    response is meant to be bad). A pair row holds chosen then rejected (preference.row)."""
    from tunelab.data import preference

    rng = random.Random(seed)
    unpaired = cfg.preference == "unpaired"

    def read(path):
        return preference.read_preference(path, tokenizer, seq_len, cfg.template, unpaired, cfg.skip_bad_rows,
                                          report.skipped)

    train, eval_ = [], []
    for src in cfg.sources:
        stats = SourceStats(src.name, src.kind, src.weight)
        report.sources.append(stats)
        examples = read(src.path)
        stats.docs = len(examples)
        rng.shuffle(examples)
        n_eval = 0 if cfg.eval_path else round(cfg.eval_fraction * len(examples))
        eval_ += examples[:n_eval]
        train += _repeat(examples[n_eval:], src.epochs, rng)
        stats.eval_docs, stats.passes_started = n_eval, math.ceil(src.epochs or 1)
        stats.tokens = sum(len(preference.row(e)["input_ids"]) for e in examples[n_eval:])
    if cfg.eval_path:
        eval_ = read(cfg.eval_path)
    rng.shuffle(train)
    if not train:
        raise TunelabError(f"data.task=preference: no training records ({len(report.skipped)} bad rows skipped)")
    report.truncated = sum(1 for e in train if e.cut)
    rows = [preference.row(e) for e in train]
    report.train_rows, report.eval_rows = len(rows), len(eval_)
    report.train_tokens = sum(len(r["input_ids"]) for r in rows)
    return Built(rows, [preference.row(e) for e in eval_], report)


def _sft_records(src: SourceConfig, cfg: DataConfig, report: DataReport, qfilter: QualityFilter | None):
    """(messages, where) for each usable record of a source; bad rows raise DataError(path, line) or are
    skipped; empty/truncated responses and low-quality texts are dropped by the filters."""
    f = cfg.filters
    for line, row in iter_rows(src.path, src.format, src.text_field, cfg.skip_bad_rows, report.skipped, src.extensions, **src.hub()):
        try:
            messages = sft.to_messages(row, cfg.sft_format)
        except sft.RecordError as e:
            err = DataError(src.path, line, str(e))
            if not cfg.skip_bad_rows:
                raise err from None
            report.skipped.append(err)
            continue
        where = (src.path, line)
        if qfilter is not None and f.enabled:
            answer = sft.last_response(messages)
            why = ("empty_response" if f.empty_response and not answer.strip() else
                   "truncated_resp" if f.truncated_response and truncated_response(answer) else None)
            if why:
                qfilter.report.seen += 1
                qfilter.report.remove(why, answer or f"<empty> at {DataError(*where, '')}")
                continue
            if not qfilter.keep(sft.flat_text(messages)):
                continue
        yield messages, where


def _repeat(items: list, epochs: float | None, rng: random.Random) -> list:
    """`epochs` passes over items (None = one): whole passes, then a random part of one more."""
    epochs = 1.0 if epochs is None else epochs
    whole, frac = int(epochs), epochs - int(epochs)
    return items * whole + rng.sample(items, round(frac * len(items)))


def _sft(cfg: DataConfig, tokenizer, seq_len, seed, qfilter, report, pool=None):
    """SFT records of every source (weights do not apply: each record is used `epochs` times, default
    once), split into train/eval, encoded with loss on responses only."""
    rng = random.Random(seed)
    train, eval_ = [], []
    for src in cfg.sources:
        stats = SourceStats(src.name, src.kind, src.weight)
        report.sources.append(stats)
        records = list(_sft_records(src, cfg, report, qfilter))
        stats.docs = len(records)
        rng.shuffle(records)
        n_eval = 0 if cfg.eval_path else round(cfg.eval_fraction * len(records))
        eval_ += records[:n_eval]
        train += [(r, stats) for r in _repeat(records[n_eval:], src.epochs, rng)]
        stats.eval_docs = n_eval
        stats.passes_started = math.ceil(src.epochs or 1)
    if cfg.eval_path:
        eval_src = SourceConfig(name="eval", path=cfg.eval_path)
        eval_ = list(_sft_records(eval_src, cfg, report, None))
    if cfg.filters.enabled and cfg.filters.eval_overlap:
        seen = {sft.prompt_key(m) for m, _ in eval_}
        overlap = [(r, s) for r, s in train if sft.prompt_key(r[0]) in seen]
        for (messages, _), _ in overlap:
            qfilter.report.remove("eval_overlap", sft.prompt_key(messages))
        train = [(r, s) for r, s in train if sft.prompt_key(r[0]) not in seen]
    rng.shuffle(train)
    encoded = _encode_all([m for (m, _), _ in train], tokenizer, seq_len, sft.options(cfg), pool)
    train_docs = [_count(enc, where, seq_len, cfg, report, stats) for enc, ((_, where), stats) in zip(encoded, train)]
    encoded = _encode_all([m for m, _ in eval_], tokenizer, seq_len, sft.options(cfg), pool)
    eval_docs = [_count(enc, where, seq_len, cfg, report, None) for enc, (_, where) in zip(encoded, eval_)]
    return [d for d in train_docs if d], [d for d in eval_docs if d]


def _try_encode(messages, tokenizer, seq_len: int, chat: dict) -> sft.Encoded | sft.RecordError:
    try:
        return sft.encode({"messages": messages}, tokenizer, seq_len, format="chat", **chat)
    except sft.RecordError as e:
        return e


def _encode_record(job) -> sft.Encoded | sft.RecordError:  # runs in a worker
    messages, seq_len, chat = job
    return _try_encode(messages, _worker_tokenizer, seq_len, chat)


def _encode_all(conversations: list, tokenizer, seq_len: int, chat: dict, pool) -> list:
    """sft.encode of each conversation (an Encoded, or the RecordError it raised), in order; `chat`: the
    template options (sft.options)."""
    if pool is None:
        return [_try_encode(m, tokenizer, seq_len, chat)
                for m in tqdm(conversations, desc="sft", unit="ex", disable=None, leave=False)]
    jobs = [(m, seq_len, chat) for m in conversations]
    return list(tqdm(pool.map(_encode_record, jobs, chunksize=64), total=len(jobs), desc="sft", unit="ex",
                     disable=None, leave=False))


def _count(enc, where, seq_len, cfg: DataConfig, report: DataReport, stats: SourceStats | None):
    """(ids, labels) of one encoded conversation, or None when it failed and skip_bad_rows skips it; counts
    truncations and tokens in the report."""
    if isinstance(enc, sft.RecordError):
        err = DataError(*where, str(enc))
        if not cfg.skip_bad_rows:
            raise err from None
        report.skipped.append(err)
        return None
    if enc.cut:
        report.truncated += 1
        if len(report.truncated_examples) < 3:
            report.truncated_examples.append(str(DataError(*where, f"{enc.cut} tokens cut at max length {seq_len}")))
    if stats is not None:
        stats.tokens += len(enc.input_ids)
    return enc.input_ids, enc.labels

"""`tunelab data ...`: build a local corpus, inspect a mixture, filter a file, scan for prompt injection,
prepare a run's tokenized data."""

from __future__ import annotations

import argparse
import errno
import json
import os
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser("build-corpus", help="write a local corpus (stdlib code, prose or Q&A) as JSONL")
    p.add_argument("--kind", choices=["code", "prose", "qa"], required=True)
    p.add_argument("--out", required=True, help="output .jsonl file (written atomically)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-docs", type=int, default=None, help="stop after this many records")

    p = sub.add_parser("inspect", help="docs, tokens, asked vs realised shares and samples per source")
    p.add_argument("config", nargs="?", help="a YAML file with a `data:` section (other keys are ignored)")
    p.add_argument("--source", action="append", default=[], metavar="PATH",
                   help="a source path instead of a config (repeatable; also local:code, local:prose, local:qa)")
    p.add_argument("--weight", action="append", type=float, default=[], help="weight of each --source, in order")
    p.add_argument("--task", choices=["pretrain", "sft"], default="pretrain", help="with --source (default pretrain)")
    p.add_argument("--max-tokens", type=int, default=200_000, help="pretrain: tokens to draw when the config sets none")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--samples", type=int, default=2, help="samples shown per source")
    p.add_argument("--tokenizer", default=None, help="an HF tokenizer folder (default: the bundled SmolLM2's)")

    p = sub.add_parser("filter", help="run the quality filters over a JSONL file; report what each removed")
    p.add_argument("input")
    p.add_argument("--out", required=True, help="output .jsonl of the kept records (written atomically)")
    p.add_argument("--text-field", default="text", help="field with the text; SFT records without it are read as chats")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip and count malformed rows instead of stopping")
    p.add_argument("--near-dedup", action="store_true", help="also drop near-duplicates (MinHash + LSH)")
    p.add_argument("--threshold", type=float, default=None, help="near-dedup Jaccard threshold (default 0.8)")
    p.add_argument("--no-exact-dedup", action="store_true")
    for name in ("min-chars", "max-chars"):
        p.add_argument(f"--{name}", type=int, default=None)
    for name in ("max-symbol-ratio", "min-alnum-ratio", "max-repeated-line-ratio", "max-repeated-ngram-ratio"):
        p.add_argument(f"--{name}", type=float, default=None, help="(negative = off)")

    p = sub.add_parser("prepare", help="tokenize, filter, mask and pack a run config's data into memory-mapped "
                       "shards with a manifest; `tunelab train` reuses them while the manifest matches")
    p.add_argument("config", help="a run config (its model's tokenizer, train.seq_len and train.seed are used)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="as for tunelab train, e.g. train.seq_len=1024")
    p.add_argument("--out", default=None, help="the prepared folder (default: the config's data.prepared); "
                   "train with data.prepared=DIR to reuse it")
    p.add_argument("--num-proc", type=int, default=None, help="tokenizing processes (default: data.num_proc)")

    p = sub.add_parser("scan", help="flag examples whose text carries instructions aimed at the model")
    p.add_argument("file")
    p.add_argument("--fail-on-find", action="store_true", help="exit 1 when anything is found")
    p.add_argument("--show", type=int, default=50, help="finds listed (all are counted)")


def run(args: argparse.Namespace) -> int:
    return {"build-corpus": _build_corpus, "inspect": _inspect, "filter": _filter, "scan": _scan,
            "prepare": _prepare}[args.data_command](args)


def write_jsonl_atomic(path: str | Path, records) -> int:
    """Write records as JSONL to a temp file beside `path`, then rename: `path` is never half-written.
    A failed write (disk full, no permission) is one TunelabError; `path` is left as it was."""
    n = 0
    with atomic_writer(path) as write:
        for r in records:  # errors reading the records (DataError) pass through as they are
            write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


@contextmanager
def atomic_writer(path: str | Path):
    """Yield `write(text)` into a temp file beside `path`; when the block ends it is synced and renamed onto
    `path`, and on any error it is removed. An OSError of the writing itself becomes a TunelabError."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(e, path) from None
    f = os.fdopen(fd, "w", encoding="utf-8")

    def write(text: str) -> None:
        try:
            f.write(text)
        except OSError as e:
            raise _write_error(e, path) from None

    try:
        yield write
        try:
            f.flush()  # a full disk often shows only here or at fsync: writes before went to buffers
            os.fsync(f.fileno())
            f.close()
            os.replace(tmp, path)
        except OSError as e:
            raise _write_error(e, path) from None
    finally:
        if not f.closed:
            with suppress(OSError):  # its buffer may still hold what did not fit; that is dropped
                f.close()
        with suppress(FileNotFoundError):
            os.unlink(tmp)


def _write_error(e: OSError, path: Path):
    from tunelab.errors import TunelabError

    full = e.errno == errno.ENOSPC
    why = "no space left on device" if full else (e.strerror or str(e)).lower()
    return TunelabError(f"{why} while writing {path} (nothing written there; a file already there is unchanged): "
                        + ("free space, or choose another --out" if full else "choose another --out"))


def _build_corpus(args) -> int:
    from tunelab.data.corpus import local_corpus

    n = write_jsonl_atomic(args.out, local_corpus(args.kind, args.seed, args.max_docs))
    print(f"wrote {n} {args.kind} records to {args.out}")
    return 0


def load_data_config(path: str):
    """The `data:` section of a YAML run config, validated as DataConfig (other top-level keys ignored)."""
    import yaml
    from pydantic import ValidationError

    from tunelab.data.config import DataConfig
    from tunelab.errors import ConfigError

    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict) or "data" not in doc:
        raise ConfigError(f"{path}: no `data:` section")
    try:
        return DataConfig.model_validate(doc["data"])
    except ValidationError as e:
        first = e.errors()[0]
        where = "data." + ".".join(str(x) for x in first["loc"])
        raise ConfigError(f"{path}: {where}: {first['msg']} ({e.error_count()} problem(s))") from None


def load_tokenizer(path: str | None):
    """An HF tokenizer from a folder, or the bundled SmolLM2's."""
    from transformers import AutoTokenizer

    from tunelab.errors import TunelabError

    if path is None:
        from tunelab.models.bundled import tokenizer_dir

        path = tokenizer_dir()
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise TunelabError(f"cannot load a tokenizer from {path}: {str(e).splitlines()[0]}") from None


def _inspect(args) -> int:
    from tunelab.data.config import DataConfig, SourceConfig
    from tunelab.data.pipeline import build
    from tunelab.errors import ConfigError

    if args.seq_len < 2:  # as train.seq_len: a prompt token and a label at least
        raise ConfigError(f"--seq-len must be 2 or more, got {args.seq_len}")
    if args.config and args.source:
        raise ConfigError("give a CONFIG.yaml or --source paths, not both")
    if args.config:
        cfg = load_data_config(args.config)
    elif args.source:
        weights = args.weight or [1.0] * len(args.source)
        if len(weights) != len(args.source):
            raise ConfigError(f"{len(args.source)} --source but {len(weights)} --weight")
        sources = [SourceConfig(name=Path(p).stem or p, path=p, weight=w,
                                kind=p.split(":", 1)[1] if p.startswith("local:") else "web")
                   for p, w in zip(args.source, weights)]
        cfg = DataConfig(task=args.task, sources=sources)
    else:
        raise ConfigError("give a CONFIG.yaml or at least one --source PATH")
    if cfg.task == "pretrain" and cfg.max_tokens is None:
        cfg = cfg.model_copy(update={"max_tokens": args.max_tokens})
    built = build(cfg, load_tokenizer(args.tokenizer), args.seq_len)
    print(built.report.summary())
    for s in built.report.sources:
        for text in s.samples[: args.samples]:
            print(f"\n--- sample from {s.name} ---\n{text[:400]}" + (" [...]" if len(text) > 400 else ""))
    return 0


def _prepare(args) -> int:
    from tunelab.config import load_config
    from tunelab.data import prepared
    from tunelab.data.validate import check
    from tunelab.errors import ConfigError
    from tunelab.models.load import load_tokenizer, model_folder
    from tunelab.train.run import early_tokenizer

    overrides = list(args.overrides) + ([f"data.num_proc={args.num_proc}"] if args.num_proc is not None else [])
    cfg = load_config(args.config, overrides)
    out = args.out or cfg.data.prepared
    if not out:
        raise ConfigError("give --out DIR, or set data.prepared in the config (then `tunelab train` finds it there)")
    check(cfg.data)  # paths, formats and first records before the tokenizer loads
    tok = early_tokenizer(cfg)
    if tok is None:  # a .gguf source (converted once, cached) or trust_remote_code (asked for in the config)
        tok = load_tokenizer(model_folder(cfg.model.source), cfg.model.trust_remote_code)
    check(cfg.data, tok)
    train, eval_ = prepared.load_or_build(cfg.data, tok, cfg.train.seq_len, cfg.train.seed, Path(out))
    print(f"prepared data in {out}: {len(train)} train rows, {len(eval_)} eval rows; train on it with: "
          f"tunelab train {args.config} data.prepared={out}")
    return 0


def _filter_config(args):
    from tunelab.data.config import FilterConfig

    overrides = {"near_dedup": args.near_dedup, "exact_dedup": not args.no_exact_dedup}
    if args.threshold is not None:
        overrides["near_dedup_threshold"] = args.threshold
    for key in ("min_chars", "max_chars", "max_symbol_ratio", "min_alnum_ratio",
                "max_repeated_line_ratio", "max_repeated_ngram_ratio"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = None if value < 0 else value
    return FilterConfig(**overrides)


def _filter(args) -> int:
    from tqdm.auto import tqdm

    from tunelab.data import sft
    from tunelab.data.filters import QualityFilter
    from tunelab.data.sources import iter_rows
    from tunelab.errors import DataError

    qf = QualityFilter(_filter_config(args))
    skipped: list[DataError] = []

    def text_of(line, row) -> str:
        if args.text_field in row:
            if not isinstance(row[args.text_field], str):
                raise DataError(args.input, line, f"field {args.text_field!r} is {type(row[args.text_field]).__name__}, expected a string")
            return row[args.text_field]
        try:
            return sft.flat_text(sft.to_messages(row))
        except sft.RecordError as e:
            raise DataError(args.input, line, f"{e} (and no {args.text_field!r} field)") from None

    def kept():
        rows = iter_rows(args.input, "auto", args.text_field, args.skip_bad_rows, skipped)
        for line, row in tqdm(rows, desc="filter", unit="rec", disable=None, leave=False):
            try:
                text = text_of(line, row)
            except DataError as e:
                if not args.skip_bad_rows:
                    raise
                skipped.append(e)
                continue
            if qf.keep(text):
                yield row

    n = write_jsonl_atomic(args.out, kept())
    print(qf.report.summary())
    if skipped:
        print(f"skipped {len(skipped)} bad rows, e.g. {skipped[0]}")
    print(f"wrote {n} records to {args.out}")
    return 0


def _scan(args) -> int:
    from tunelab.data.scan import scan_file, summary

    findings = list(scan_file(args.file))
    for f in findings[: args.show]:
        print(f)
    if len(findings) > args.show:
        print(f"... {len(findings) - args.show} more")
    print(summary(findings, args.file))
    return 1 if findings and args.fail_on_find else 0

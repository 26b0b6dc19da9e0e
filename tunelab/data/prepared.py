"""Prepared data: the built (train, eval) rows stored as memory-mapped .npy shards with a manifest.

A prepared folder holds, per split (`train`, `eval`) and shard k, four arrays (no pickles):
  `{split}-{k:05d}.input_ids.npy`, `.labels.npy`, `.position_ids.npy`  int32, every row's tokens end to end
  `{split}-{k:05d}.offsets.npy`  int64 (rows + 1,): row i is [offsets[i], offsets[i + 1]) of the three above
  `{split}-{k:05d}.desirable.npy`  int8 (rows,), only for KTO's unpaired responses: 1 desirable, 0 not
and `manifest.json`: the fingerprint of what made them (each source's content hash, the tokenizer's and chat
template's hashes, the data section, seq_len, seed, the tunelab version), the byte size of every shard file,
and the build report (as printed, and as numbers: `data_report`, which `tunelab board` shows). `load_or_build` reuses the folder while the fingerprint matches and rebuilds it when
anything in it changed; the folder is written beside itself and renamed into place, so it is never half-written.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tunelab.data import sft
from tunelab.data.config import DataConfig
from tunelab.data.sources import LOCAL_PREFIX, hub_dataset, is_hub_id

FORMAT = 1                # bump when the files' layout changes: older folders are then rebuilt
ROWS_PER_SHARD = 1 << 16  # rows per shard file; a shard's arrays are memory-mapped, never read whole
FIELDS = ("input_ids", "labels", "position_ids")
# data keys that say where and how fast, or how finished predictions are scored, not what the rows hold:
# not fingerprinted
NOT_CONTENT = {"prepared", "num_proc", "postprocess"}


def _sha256_file(path: Path, h=None):
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h


def content_hash(path: str, revision: str | None = None) -> str:
    """SHA-256 of a source's bytes: a file; a folder's files (relative names and contents, sorted), a Hub
    dataset id's snapshot folder at `revision`; for a builtin `local:` corpus, its name and the Python
    version (it is read from the standard library)."""
    if path.startswith(LOCAL_PREFIX):
        return hashlib.sha256(f"{path}:{sys.version}".encode()).hexdigest()
    p = hub_dataset(path, revision) if is_hub_id(path) else Path(path)
    if p.is_file():
        return _sha256_file(p).hexdigest()
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        h.update(str(f.relative_to(p)).encode() + b"\0")
        _sha256_file(f, h)
    return h.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """SHA-256 of what decides token ids: the fast tokenizer's whole JSON (vocab, merges, normalizer,
    pre-tokenizer, added tokens), or else the vocabulary; and the EOS and pad ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{text}\0{tokenizer.eos_token_id}\0{tokenizer.pad_token_id}".encode()).hexdigest()


def fingerprint(cfg: DataConfig, tokenizer, seq_len: int, seed: int) -> dict:
    """Everything the prepared rows depend on; equal fingerprints give equal rows."""
    from tunelab import __version__

    paths = [(s.name, s.path, s.revision) for s in cfg.sources] + ([("eval", cfg.eval_path, None)] if cfg.eval_path else [])
    paths += [("test", cfg.test_path, None)] if cfg.task == "spans" and cfg.test_path else []  # labels come from it too
    template = sft.chat_template(tokenizer, cfg.template) if cfg.task in ("sft", "preference") else None
    return {"format": FORMAT, "tunelab": __version__, "seq_len": seq_len, "seed": seed,
            "data": cfg.model_dump(mode="json", exclude=NOT_CONTENT),
            "sources": [{"name": n, "path": p, "sha256": content_hash(p, r)} for n, p, r in paths],
            "tokenizer_sha256": tokenizer_hash(tokenizer),
            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None}


def _diff(old: dict, new: dict) -> str:
    """What differs between two fingerprints, in words."""
    if old.get("format") != new["format"] or old.get("tunelab") != new["tunelab"]:
        return f"written by tunelab {old.get('tunelab')} (format {old.get('format')})"
    for a, b in zip(old.get("sources", []), new["sources"]):
        if a != b:
            return f"source {b['name']!r} ({b['path']}) changed"
    for key, what in (("sources", "the list of sources"), ("tokenizer_sha256", "the tokenizer"),
                      ("chat_template_sha256", "the chat template"), ("data", "the data section"),
                      ("seq_len", "train.seq_len"), ("seed", "the seed")):
        if old.get(key) != new[key]:
            return f"{what} changed"
    return "it differs"


class Rows(Sequence):
    """The rows of one split, read from memory-mapped shards: rows[i] is a dict of int lists as the
    in-memory build gives; rows[a:b] a list of them."""

    def __init__(self, shards: list[dict]):
        self.shards = shards
        self.starts = [0]
        for s in shards:
            self.starts.append(self.starts[-1] + len(s["offsets"]) - 1)

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = bisect.bisect_right(self.starts, i) - 1
        s = self.shards[k]
        a, b = int(s["offsets"][i - self.starts[k]]), int(s["offsets"][i - self.starts[k] + 1])
        row = {f: s[f][a:b].tolist() for f in FIELDS}
        if "desirable" in s:  # KTO's unpaired responses: one flag per row
            row["desirable"] = bool(s["desirable"][i - self.starts[k]])
        return row


def _write_split(folder: Path, split: str, rows: list[dict]) -> list[str]:
    names = []
    for k, first in enumerate(range(0, max(len(rows), 1), ROWS_PER_SHARD)):
        part = rows[first:first + ROWS_PER_SHARD]
        stem = f"{split}-{k:05d}"
        lengths = [len(r["input_ids"]) for r in part]
        arrays = {f: np.fromiter((t for r in part for t in r[f]), dtype=np.int32, count=sum(lengths)) for f in FIELDS}
        arrays["offsets"] = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
        if part and "desirable" in part[0]:
            arrays["desirable"] = np.array([r["desirable"] for r in part], dtype=np.int8)  # (rows,)
        for f, a in arrays.items():
            np.save(folder / f"{stem}.{f}.npy", a, allow_pickle=False)
            names.append(f"{stem}.{f}.npy")
    return names


def write(folder: Path, train: list[dict], eval_: list[dict], fp: dict, report: str, data_report: dict | None = None) -> None:
    """Write the rows and manifest into a temporary folder beside `folder`, then rename it into place.
    `report` is the build report as printed, `data_report` the same as numbers (DataReport.to_dict)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files = {"train": _write_split(tmp, "train", train), "eval": _write_split(tmp, "eval", eval_)}
        sizes = {n: (tmp / n).stat().st_size for names in files.values() for n in names}
        manifest = {"fingerprint": fp, "files": files, "bytes": sizes, "rows": {"train": len(train), "eval": len(eval_)},
                    "report": report, "data_report": data_report}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        old = folder.parent / f".old-{folder.name}-{os.getpid()}"
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def load(folder: Path, manifest: dict) -> tuple[Rows, Rows]:
    """The (train, eval) rows of a prepared folder, memory-mapped."""
    def split(name):
        names = manifest["files"][name]
        stems = sorted({n.split(".")[0] for n in names})
        return Rows([{f: np.load(folder / f"{s}.{f}.npy", mmap_mode="r", allow_pickle=False)
                      for f in FIELDS + ("offsets", "desirable") if f"{s}.{f}.npy" in names} for s in stems])

    return split("train"), split("eval")


def check(folder: Path, fp: dict) -> tuple[dict | None, str]:
    """(manifest, "") when `folder` holds complete rows made from `fp`; else (None, why not)."""
    manifest = read_manifest(folder)
    if manifest is None:
        return None, "none there yet"
    if manifest.get("fingerprint") != fp:
        return None, _diff(manifest.get("fingerprint") or {}, fp)
    for name, size in manifest.get("bytes", {}).items():
        if not (Path(folder) / name).is_file() or (Path(folder) / name).stat().st_size != size:
            return None, f"{name} is missing or cut short"
    return manifest, ""


def load_or_build(cfg: DataConfig, tokenizer, seq_len: int, seed: int, folder: Path, write_it: bool = True,
                  verbose: bool = True):
    """(train, eval) rows: from `folder` when its manifest matches (no tokenizing), else built (and written
    there when write_it: under torchrun every process builds, rank 0 writes)."""
    from tunelab.data.pipeline import build

    folder = Path(folder)
    fp = fingerprint(cfg, tokenizer, seq_len, seed)
    manifest, why = check(folder, fp)
    if manifest is not None:
        if verbose:
            print(f"tunelab: reusing the prepared data in {folder} (its manifest matches: same sources, tokenizer, "
                  f"template and data config; nothing is tokenized)\n{manifest['report']}")
        return load(folder, manifest)
    if verbose and why != "none there yet":
        print(f"tunelab: rebuilding the prepared data in {folder}: {why}")
    built = build(cfg, tokenizer, seq_len, seed)
    report = built.report.summary()
    if verbose:
        print(report)
    if write_it:
        write(folder, built.train, built.eval, fp, report, built.report.to_dict())
    return built.train, built.eval

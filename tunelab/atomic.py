"""Folders written atomically: files into a temporary folder, fsynced, a manifest (size and SHA-256 of each
file) last, then one rename into place. A crash at any point leaves the complete folder or none, and a folder
whose manifest does not match its files is never taken for a finished one. Checkpoints, adapters, merged and
quantized model folders are all written this way.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.train import faults


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != "manifest.json")
    manifest = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    tmp = folder / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, folder / "manifest.json")


def verify(folder: Path) -> str | None:
    """None if every file matches the manifest, else what is wrong."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return "no readable manifest.json"
    if not manifest or not isinstance(manifest, dict) or not all(isinstance(m, dict) for m in manifest.values()):
        return "manifest.json lists no files"
    for name, meta in manifest.items():
        p = folder / name
        if not p.is_file() or p.stat().st_size != meta.get("bytes"):
            return f"{name} is missing or has the wrong size"
        if _sha256(p) != meta.get("sha256"):
            return f"{name} does not match its SHA-256"
    return None


def check_model_folder_dest(out: Path, what: str = "") -> None:
    """A model folder may replace an earlier model folder (it has config.json), never a file or a folder of
    other things; `what` prefixes the message (e.g. the flag that named the path)."""
    if out.exists() and not out.is_dir():
        raise TunelabError(f"{what}{out} is a file; give a folder (new, empty, or a model folder to replace)")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise TunelabError(f"{what}{out} exists and is not a model folder; choose an empty or new folder")


def atomic_folder(dest: Path, write) -> None:
    """Call write(tmp_folder), add a manifest, then rename into `dest` (replacing an older one)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        for p in tmp.iterdir():
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
        faults.point("ckpt_manifest")
        write_manifest(tmp)
        faults.point("ckpt_rename")
        if dest.exists():
            old = dest.parent / f".old-{dest.name}-{os.getpid()}"
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

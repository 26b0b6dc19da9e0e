"""Checkpoints: safetensors + JSON, written atomically, verified on load, keep-last-N.

A checkpoint is a folder `step-00000042/` holding `weights.safetensors` (trainable parameters only),
`optimizer.safetensors` (AdamW moments by parameter name), `state.json` (step, data position, RNG, metrics)
and `manifest.json` (size and SHA-256 of each file). It is written into a temporary folder and renamed into
place, manifest last (tunelab.atomic), so a crash at any point leaves either the complete checkpoint or none; a folder
whose manifest does not match its files is never taken for a checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tunelab.atomic import atomic_folder, verify
from tunelab.errors import TunelabError
from tunelab.train import faults, fsdp

PREFIX = "step-"


def write_error(e: OSError | SafetensorError, dest: Path, kept: str) -> TunelabError:
    """A write that failed (disk full, permissions) as one line: where, why, what survived, what to do."""
    code = getattr(e, "errno", None)
    if code is None and (m := re.search(r"os error (\d+)", str(e))):  # safetensors wraps the OS error
        code = int(m.group(1))
    why = "no space left on device" if code == errno.ENOSPC else (os.strerror(code) if code else str(e))
    return TunelabError(f"{why} while writing {dest} (nothing half-written was kept; {kept}): "
                        "free space or fix the folder, then rerun with resume=true")


def remove_partial(root: Path) -> list[Path]:
    """Delete the temporary folders a crashed checkpoint write left in `root`; return them."""
    stale = [p for p in root.glob(".tmp-*") if p.is_dir()] if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def gather(model, optimizer) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(trainable weights, AdamW state) by parameter name, as whole tensors on the CPU.

    Under FSDP every process must call it (each sharded tensor is all-gathered in turn, one at a time);
    the files written from it are the same as a single process writes.
    """
    names = {p: n for n, p in model.named_parameters() if p.requires_grad}
    moments = {f"{names[p]}::{k}": v if torch.is_tensor(v) else torch.tensor(v)
               for p, st in optimizer.state.items() for k, v in st.items()}
    return fsdp.whole_state({n: p for p, n in names.items()}), fsdp.whole_state(moments)


def save(root: Path, step: int, tensors: tuple[dict, dict], state: dict, keep_last: int) -> Path:
    """Write checkpoint `root/step-XXXXXXXX` from gather()'s tensors; delete all but the newest `keep_last`."""
    weights, moments = tensors
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()

    def write(tmp: Path):
        save_file(weights, tmp / "weights.safetensors")
        faults.point("ckpt_weights")
        save_file(moments, tmp / "optimizer.safetensors")
        faults.point("ckpt_optimizer")
        save_file(rng, tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))

    dest = root / f"{PREFIX}{step:08d}"
    try:
        atomic_folder(dest, write)
    except (OSError, SafetensorError) as e:
        kept = latest(root)
        raise write_error(e, dest, f"the checkpoint {kept} is intact" if kept else "no earlier checkpoint exists") from e
    faults.point("ckpt_prune")
    for old in list_complete(root)[:-keep_last]:
        trash = root / f".tmp-pruned-{old.name}"  # renamed first: a crash mid-delete leaves no half step folder
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return dest


def list_complete(root: Path) -> list[Path]:
    """Checkpoint folders with a manifest, oldest first (temporary folders are never listed)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "manifest.json").is_file())


def latest(root: Path) -> Path | None:
    """The newest checkpoint whose files match their manifest; damaged ones are reported and skipped."""
    for folder in reversed(list_complete(root)):
        problem = verify(folder)
        if problem is None:
            return folder
        print(f"tunelab: skipping damaged checkpoint {folder} ({problem})")
    return None


def load(folder: Path, model, optimizer) -> dict:
    """Restore trainable weights, optimizer moments and RNG; return state.json (collective under FSDP)."""
    problem = verify(folder)
    if problem:
        raise TunelabError(f"checkpoint {folder}: {problem}; delete it to resume from an older one")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    weights = load_file(folder / "weights.safetensors")
    if set(weights) != set(params):
        missing = sorted(set(params) - set(weights))[:3]
        raise TunelabError(
            f"checkpoint {folder} does not match this run's trainable parameters (e.g. {missing}); "
            "resume with the same config it was written with"
        )
    with torch.no_grad():
        for n, t in weights.items():
            fsdp.local(params[n]).copy_(fsdp.local(fsdp.shard_like(t, params[n])))
    fused = optimizer.defaults.get("fused")  # torch's fused AdamW keeps its step count on the parameter's device
    for key, t in load_file(folder / "optimizer.safetensors").items():
        name, k = key.split("::")
        p = params[name]
        optimizer.state[p][k] = fsdp.shard_like(t, p) if k != "step" else t.to(p.device) if fused else t
    rng = load_file(folder / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((folder / "state.json").read_text())

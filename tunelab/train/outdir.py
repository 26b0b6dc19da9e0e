"""Where a run writes: a new folder for every run, and never over another run's results.

With no `output_dir`, each run gets `runs/<config name>-<UTC time>` (a `-2`, `-3` suffix when two start in
the same second) and `runs/latest` is a symlink to the newest one that started training. An explicit
`output_dir` that already holds a run is refused unless the run is resumed (`resume=true`) or replaced
(`--overwrite`, which deletes that run's own files and nothing else in the folder).
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from pathlib import Path

from tunelab.errors import ConfigError, TunelabError

RUNS = Path("runs")
# Everything a run writes into its folder (train/run.py, train/loop.py, data/prepared.py); other files
# there (e.g. the quickstart's data/) are not the run's and are never deleted.
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "summary.json", "adapter", "model", "tensorboard",
             "loss.png", "prepared", "spans.json", "best", "mlruns", "mlflow.json", "status.json", "reference_logps")


def held_run(out: Path) -> list[str]:
    """The run files already in `out` (empty: no run there)."""
    return [n for n in RUN_FILES if (out / n).exists() or (out / n).is_symlink()] if out.is_dir() else []


def check_free(out: Path, resume: bool, overwrite: bool) -> list[str]:
    """Refuse `out` when it holds a run that is neither resumed nor to be replaced; return the run files
    that `--overwrite` will delete (see clear)."""
    if resume and overwrite:
        raise ConfigError("resume=true continues the run in output_dir and --overwrite replaces it: give one")
    if out.exists() and not out.is_dir():
        raise TunelabError(f"output_dir {out} is a file; give a folder (new, or a run to resume)")
    found = held_run(out)
    if found and not resume and not overwrite:
        state = "a finished" if "summary.json" in found else "an unfinished"
        raise TunelabError(f"output_dir {out} already holds {state} run ({', '.join(found)}): continue it with "
                           "resume=true, replace it with --overwrite, or leave output_dir unset for a new folder")
    return found if overwrite else []


def clear(out: Path, names: list[str]) -> None:
    """Delete the named run files of `out` (from check_free), before a replacing run writes anything."""
    for name in names:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def new_run_dir(name: str, root: Path = RUNS) -> Path:
    """Create and return a new folder `root/<name>-<YYYYmmdd-HHMMSS UTC>` (mkdir without exist_ok: two runs
    starting in the same second get different folders)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    root.mkdir(parents=True, exist_ok=True)
    for k in itertools.count(1):
        path = root / (f"{name}-{stamp}" if k == 1 else f"{name}-{stamp}-{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def newest_run(name: str, root: Path = RUNS) -> Path | None:
    """The newest `root/<name>-<time>` folder holding a run (the time sorts as text)."""
    runs = sorted(p for p in root.glob(f"{name}-2*") if p.is_dir() and held_run(p)) if root.is_dir() else []
    return runs[-1] if runs else None


def point_latest(run: Path) -> None:
    """Make `<run's parent>/latest` a symlink to `run` (atomically: a new link renamed over the old one).
    A real folder named `latest` (written by tunelab before 0.2) is left alone."""
    link = run.parent / "latest"
    if link.exists() and not link.is_symlink():
        print(f"tunelab: {link} is a folder, not a link, so it was left as it is; this run is in {run}")
        return
    tmp = run.parent / f".latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(run.name, tmp)
    os.replace(tmp, link)


def claim(output_dir: str | None, name: str, resume: bool, overwrite: bool) -> tuple[Path, bool]:
    """The folder this run writes to, and whether it was made new (then `runs/latest` follows it once the
    run starts). No output_dir: a new folder, or with resume=true the newest run of this config name."""
    if output_dir is None:
        if overwrite:
            raise ConfigError("--overwrite replaces the run in output_dir, and none is set: a new folder is used anyway")
        if not resume:
            return new_run_dir(name), True
        last = newest_run(name)
        if last is None:
            raise ConfigError(f"resume=true: no run of {name!r} under {RUNS}/ to continue; give output_dir=FOLDER")
        print(f"tunelab: resuming the newest run of {name!r}: {last}")
        return last, False
    out = Path(output_dir)
    clear(out, check_free(out, resume, overwrite))
    return out, False

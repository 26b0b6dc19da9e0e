"""What the board knows about runs, read from run folders only (no web framework here; tests call it directly).

A run is a folder under RUNS_DIR (up to 3 levels deep, e.g. a sweep's cells) holding config.yaml,
metrics.jsonl or status.json. Runs are named by their path relative to RUNS_DIR; `locate` refuses any name
that leaves RUNS_DIR (`..`, an absolute path, a symlink pointing outside).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import yaml

from tunelab.errors import TunelabError
from tunelab.train import status as run_status

MARKERS = ("config.yaml", "metrics.jsonl", "status.json")
MAX_DEPTH = 3
STALE_S = 600  # a run on another host whose heartbeat is older than this is shown as stopped


class BoardError(TunelabError):
    """A request the board answers with a clear message and an HTTP status (404 unknown run, 400 bad input)."""

    def __init__(self, message: str, code: int = 400):
        super().__init__(message)
        self.code = code


def locate(root: Path, name: str) -> Path:
    """The folder of run `name` under `root`, refused when it would lie outside root or is not a run."""
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts:
        raise BoardError(f"run {name!r}: names are paths relative to the runs folder, without '..'", 400)
    real, top = (root / name).resolve(), root.resolve()
    if real != top and top not in real.parents:
        raise BoardError(f"run {name!r} resolves to {real}, outside the runs folder {top}: refused", 403)
    if not real.is_dir() or not any((real / m).exists() for m in MARKERS):
        raise BoardError(f"no run {name!r} under {top} (a run folder holds config.yaml or metrics.jsonl)", 404)
    return real


def find_runs(root: Path) -> list[str]:
    """Names of the run folders under root (symlinks such as `latest` are not followed: no run twice)."""
    found = []

    def walk(d: Path, depth: int):
        try:
            children = sorted(d.iterdir())
        except OSError:
            return
        for c in children:
            if c.is_symlink() or not c.is_dir() or c.name.startswith("."):
                continue
            if any((c / m).exists() for m in MARKERS):
                found.append(c.relative_to(root).as_posix())
            elif depth < MAX_DEPTH:
                walk(c, depth + 1)

    walk(root, 1)
    return found


def read_config(run: Path) -> tuple[dict | None, str | None]:
    """(config mapping, None), or (None, why not) for a missing or broken config.yaml."""
    path = run / "config.yaml"
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, "config.yaml is missing"
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        return None, f"config.yaml cannot be read: {str(e).splitlines()[0]}"
    return (cfg, None) if isinstance(cfg, dict) else (None, "config.yaml is not a mapping")


def read_metrics(run: Path, since: int = 0) -> dict:
    """Rows of metrics.jsonl from line `since` on. Only lines ending in a newline count (a line being written
    is left for the next poll); a line that is not a JSON object (cut short by a crash) is skipped and
    reported. `next` is the line number to ask from next time."""
    try:
        data = (run / "metrics.jsonl").read_bytes()
    except FileNotFoundError:
        return {"rows": [], "next": 0, "bad_lines": [], "missing": True}
    lines = data.split(b"\n")[:-1]  # the part after the last newline is unfinished
    rows, bad = [], []
    for i in range(max(0, since), len(lines)):
        try:
            row = json.loads(lines[i])
            if not isinstance(row, dict) or "step" not in row:
                raise ValueError("no step")
            rows.append(row)
        except ValueError:
            if lines[i].strip():
                bad.append(i + 1)
    return {"rows": rows, "next": len(lines), "bad_lines": bad, "missing": False}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def run_state(run: Path) -> dict:
    """{"state": running | finished | failed | resumable | unknown, "why": ..., and the status record}.

    resumable: not running, not finished, with a complete checkpoint (`tunelab train ... resume=true`)."""
    st = run_status.read(run) or {}
    finished = (run / "summary.json").exists()
    ckpt = (checkpoints(run) or [None])[-1]
    if st.get("state") == "running" and not finished:
        if st.get("host") == socket.gethostname():
            if isinstance(st.get("pid"), int) and _alive(st["pid"]):
                return {"state": "running", "why": f"pid {st['pid']} at step {st.get('step')}", **st}
            why = f"process {st.get('pid')} is gone (killed?)"
        elif time.time() - float(st.get("heartbeat") or 0) < STALE_S:
            return {"state": "running", "why": f"on {st.get('host')}, heartbeat {st.get('heartbeat')}", **st}
        else:
            why = f"no heartbeat from {st.get('host')} for {STALE_S} s"
    elif finished or st.get("state") == "finished":
        return {"state": "finished", "why": "summary.json written", **st}
    elif st.get("state") == "failed":
        why = st.get("error") or "failed"
    else:
        why = "no status.json (a run from before tunelab wrote one)" if not st else f"state {st.get('state')}"
    state = "resumable" if ckpt else ("failed" if st else "unknown")
    return {**st, "state": state, "why": why + (f"; last checkpoint {ckpt.name}" if ckpt else ""),
            "checkpoint": ckpt.name if ckpt else None}


def checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints (their manifest, written last, is there), oldest first. The files' hashes are not
    checked here (that reads every byte); `tunelab train resume=true` checks them and skips a damaged one."""
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / "manifest.json").is_file())


def _summary(run: Path) -> dict:
    try:
        s = json.loads((run / "summary.json").read_text())
        return s if isinstance(s, dict) else {}
    except (OSError, ValueError):
        return {}


def _last(rows: list[dict], key: str):
    return next((r[key] for r in reversed(rows) if isinstance(r.get(key), (int, float))), None)


def run_row(root: Path, name: str) -> dict:
    """One line of the runs table; never raises for a broken run (its problems are listed in `problems`)."""
    run = root / name
    cfg, cfg_err = read_config(run)
    m = read_metrics(run)
    rows, summary, state = m["rows"], _summary(run), run_state(run)
    problems = [p for p in (cfg_err, m["bad_lines"] and f"metrics.jsonl: {len(m['bad_lines'])} unreadable "
                            f"line(s) skipped (line {m['bad_lines'][0]})") if p]
    cfg = cfg or {}
    sources = ((cfg.get("data") or {}).get("sources")) or []
    try:
        started = (run / "config.yaml").stat().st_mtime
    except OSError:
        started = state.get("started")
    return {"name": name, "method": cfg.get("method"), "model": (cfg.get("model") or {}).get("source"),
            "data": ", ".join(str(s.get("name") or s.get("path")) for s in sources if isinstance(s, dict)),
            "task": (cfg.get("data") or {}).get("task"),
            "step": _last(rows, "step") or 0, "total_steps": state.get("total_steps") or summary.get("steps"),
            "final_loss": _last(rows, "loss"), "eval_loss": _last(rows, "eval_loss"),
            "started": started, "seconds": summary.get("seconds"), "status": state["state"],
            "status_why": state["why"], "problems": problems}


def run_detail(root: Path, name: str) -> dict:
    """A run's config (text and parsed), checkpoints, outputs, evaluation reports and files."""
    run = locate(root, name)
    cfg, cfg_err = read_config(run)
    try:
        cfg_text = (run / "config.yaml").read_text(encoding="utf-8", errors="replace")
    except OSError:
        cfg_text = None
    ckpts = []
    for c in checkpoints(run):
        try:
            meta = json.loads((c / "state.json").read_text())
        except (OSError, ValueError):
            meta = {}
        ckpts.append({"name": c.name, "bytes": _size(c), "step": meta.get("step"), "loss": meta.get("loss")})
    outputs = [{"name": o, "bytes": _size(run / o), "files": sorted(p.name for p in (run / o).iterdir())}
               for o in ("adapter", "model") if (run / o).is_dir()]
    return {**run_row(root, name), "config": cfg, "config_text": cfg_text, "config_error": cfg_err,
            "state": run_state(run), "summary": _summary(run), "checkpoints": ckpts, "outputs": outputs,
            "evals": [e["name"] for e in evaluations(run)],
            "files": sorted(p.name + ("/" if p.is_dir() else "") for p in run.iterdir())}


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _rate(scores) -> dict | None:
    """Mean of per-item scores with its 95% interval (tunelab.eval.stats.interval)."""
    from tunelab.eval.stats import interval, mean

    if not isinstance(scores, list) or not scores:
        return None
    return {"value": mean(scores), "interval": interval(scores), "n": len(scores)}


def _quickstart_table(q: dict) -> dict:
    """quickstart.json (before/after per-item scores) -> the metrics table the board draws."""
    from tunelab.eval.stats import exact

    labels = ["before", "after"]
    metric_scores = {
        "trained families: score (partial credit)": lambda r: r["test"]["scores"],
        "trained families: exact match": lambda r: exact(r["test"]["scores"]),
        "unseen families: score (partial credit)": lambda r: r["unseen"]["scores"],
        "cost: prompt-injection attack success": lambda r: r["attack_hits"],
        "cost: unknown-fact abstention": lambda r: r["abstained"],
    }
    rows = []
    for metric, get in metric_scores.items():
        cells = []
        for k in labels:
            try:
                cells.append(_rate(get(q[k])))
            except (KeyError, TypeError):
                cells.append(None)
        rows.append({"metric": metric, "cells": cells, "rate": True})
    for metric, get in (("held-out response loss (nats/token)", lambda r: r["eval_loss"]),
                        ("cost: held-out prose perplexity", lambda r: r["prose"]["ppl"])):
        cells = []
        for k in labels:
            try:
                cells.append({"value": float(get(q[k])), "interval": None})
            except (KeyError, TypeError, ValueError):
                cells.append(None)
        rows.append({"metric": metric, "cells": cells, "rate": False})
    return {"labels": labels, "rows": rows}


def _results_tables(results: dict) -> list[dict]:
    """eval/results.json ({model label: {suite: {"metrics", "intervals"}}}) -> one table per suite."""
    labels = [k for k, v in results.items() if isinstance(v, dict)]
    suites = list(dict.fromkeys(s for k in labels for s in results[k] if isinstance(results[k][s], dict)))
    tables = []
    for suite in suites:
        names = list(dict.fromkeys(m for k in labels for m in (results[k].get(suite) or {}).get("metrics", {})))
        rows = []
        for metric in names:
            cells = []
            for k in labels:
                r = results[k].get(suite) or {}
                v = r.get("metrics", {}).get(metric)
                cells.append({"value": v, "interval": (r.get("intervals") or {}).get(metric)}
                             if isinstance(v, (int, float)) else None)
            rate = all(c is None or 0 <= c["value"] <= 1 for c in cells) and any(c and c["interval"] for c in cells)
            rows.append({"metric": metric, "cells": cells, "rate": rate})
        tables.append({"title": suite, "labels": labels, "rows": rows})
    return tables


def evaluations(run: Path) -> list[dict]:
    """The run's evaluation reports as tables: quickstart.json (before/after) and every results.json that
    `tunelab eval` wrote into a folder of the run (default RUN/eval)."""
    found = []
    q = run / "quickstart.json"
    if q.is_file():
        try:
            table = _quickstart_table(json.loads(q.read_text()))
            found.append({"name": "quickstart.json", "tables": [{"title": "quickstart: before / after", **table}]})
        except (ValueError, AttributeError) as e:
            found.append({"name": "quickstart.json", "error": f"unreadable: {e}", "tables": []})
    for res in sorted(run.glob("*/results.json")):
        name = res.relative_to(run).as_posix()
        try:
            data = json.loads(res.read_text())
            if not isinstance(data, dict):
                raise ValueError("not a mapping of model label -> suites")
            found.append({"name": name, "tables": _results_tables(data)})
        except (ValueError, AttributeError) as e:
            found.append({"name": name, "error": f"unreadable: {e}", "tables": []})
    return found

"""Launching, stopping and resuming training runs from the board (no web framework here; app.py serves it).

A launch is `python -m tunelab train CONFIG key=value ... output_dir=RUNS_DIR/NAME` in its own process group
(stop = SIGTERM to the group), started in the folder the board was started in (a config's relative data
paths mean the same as on the command line), its output in NAME/train.log. Before anything starts, the
config with its overrides is validated by RunConfig itself, and refused when it would run a model's own
Python code (model.trust_remote_code) or when a path leaves the folders the board may read.

The trainer has no SIGTERM handler: a stopped run ends like a killed one, at its last complete checkpoint
(atomic, docs/reliability.md), and shows as resumable; resume runs `tunelab train NAME/config.yaml
resume=true` on the same folder.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tunelab.board.runs import BoardError, locate, run_state

LOG = "train.log"
# an override is a dotted key, `=`, a value: never an option such as --overwrite, never a second argument
OVERRIDE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*=.*", re.S)
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*){0,2}")
BOARD_SETS = ("output_dir", "resume")  # the board sets these itself
COST_METHODS = ("full", "lora", "qlora")  # what `tunelab cost` models


def inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _docstrings(cls) -> dict[str, str]:
    """Attribute docstrings (`x: int = 1` followed by a string) of a pydantic model class, by field name."""
    try:
        body = ast.parse(inspect.getsource(cls)).body[0].body
    except (OSError, TypeError, IndexError):
        return {}
    docs = {}
    for a, b in zip(body, body[1:]):
        if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
            docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def schema_fields(model=None, prefix: str = "") -> list[dict]:
    """Every settable key of RunConfig, dotted (train.lr), with its type, default, choices and documentation:
    what the launch form offers. Sections (nested models) are walked; lists and optional sections are leaves."""
    from typing import Literal, get_args, get_origin

    from pydantic import BaseModel

    if model is None:
        from tunelab.config import RunConfig as model
    docs, out = _docstrings(model), []
    for name, f in model.model_fields.items():
        ann, key = f.annotation, prefix + name
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += schema_fields(ann, key + ".")
            continue
        default = None if f.is_required() else f.get_default(call_default_factory=True)
        default = default.model_dump(mode="json") if isinstance(default, BaseModel) else default
        row = {"key": key, "type": getattr(ann, "__name__", None) or str(ann).replace("typing.", ""),
               "default": default, "required": f.is_required(), "doc": f.description or docs.get(name, "")}
        if get_origin(ann) is Literal:
            row["choices"] = list(get_args(ann))
        out.append(row)
    return out


class Job:
    """One training process started by the board; a thread waits on it so it never lingers as a zombie
    (a zombie's pid still answers kill(pid, 0), and the runs table would call the run running)."""

    def __init__(self, name: str, command: list[str], cwd: Path, log: Path):
        self.name, self.command, self.log, self.started = name, command, log, time.time()
        self.stopped = False
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"\n$ {' '.join(command)}\n")
            f.flush()
            # unbuffered: the log is read while the run writes it, and a SIGTERM loses no buffered line
            self.proc = subprocess.Popen(command, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        threading.Thread(target=self.proc.wait, daemon=True).start()

    def row(self) -> dict:
        rc = self.proc.poll()
        state = "running" if rc is None else ("stopped" if self.stopped else ("finished" if rc == 0 else "failed"))
        try:
            tail = self.log.read_text(encoding="utf-8", errors="replace")[-3000:]
        except OSError:
            tail = ""
        return {"name": self.name, "pid": self.proc.pid, "state": state, "returncode": rc, "started": self.started,
                "command": self.command, "log": tail}


class Launcher:
    """Starts runs under `root` from config files under `root` or `configs` (default: ./configs)."""

    def __init__(self, root: Path, configs: Path | None = None, cwd: Path | None = None):
        self.root, self.cwd = Path(root).resolve(), Path(cwd or os.getcwd()).resolve()
        self.configs = Path(configs).resolve() if configs else self.cwd / "configs"
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()

    # ---- what may be launched ----
    def config_files(self) -> list[dict]:
        """The config files the form offers: configs/*.yaml, and each run's config.yaml (to run it again)."""
        from tunelab.board.runs import find_runs

        found = [(p, "configs") for p in sorted(self.configs.glob("*.y*ml"))] if self.configs.is_dir() else []
        found += [(self.root / n / "config.yaml", "runs") for n in find_runs(self.root)]
        out = []
        for p, where in found:
            if p.is_file() and inside(p, self.configs if where == "configs" else self.root):
                try:
                    text = p.read_text(encoding="utf-8")[:20000]
                except (OSError, UnicodeDecodeError):
                    continue
                out.append({"path": self._shown(p), "where": where, "text": text})
        return out

    def _shown(self, p: Path) -> str:
        """The path as the page shows and sends it back: relative to the board's folder when under it."""
        return os.path.relpath(p, self.cwd) if p.is_relative_to(self.cwd) else str(p)

    def config_path(self, given) -> Path:
        """A config file named by the page: a path relative to the board's folder, or absolute; refused (403)
        outside RUNS_DIR and the configs folder."""
        if not isinstance(given, str) or not given:
            raise BoardError("give `config`: a YAML file from the list (configs/ or a run's config.yaml)")
        path = (self.cwd / given).resolve()
        if not (inside(path, self.root) or inside(path, self.configs)):
            raise BoardError(f"config {given!r} is outside the runs folder {self.root} and the configs folder "
                             f"{self.configs}: refused", 403)
        if path.suffix not in (".yaml", ".yml") or not path.is_file():
            raise BoardError(f"config {given!r}: no such YAML file", 404)
        return path

    @staticmethod
    def overrides(given) -> list[str]:
        if given is None:
            return []
        if not isinstance(given, list) or not all(isinstance(o, str) for o in given):
            raise BoardError("`overrides` must be a list of \"key=value\" strings")
        given = [o.strip() for o in given if o.strip()]
        for o in given:
            if not OVERRIDE.fullmatch(o):
                raise BoardError(f"override {o!r} is not key=value (e.g. train.lr=1e-4)")
            if o.split("=", 1)[0] in BOARD_SETS:
                raise BoardError(f"override {o!r}: the board sets output_dir (the run name) and resume (the resume "
                                 "button) itself: remove it")
        return given

    def new_run(self, name) -> Path:
        if not isinstance(name, str) or not RUN_NAME.fullmatch(name) or ".." in name:
            raise BoardError(f"run name {name!r}: letters, digits, '.', '_', '-' (up to 3 folders deep, a/b/c), "
                             "a new folder under the runs folder")
        out = self.root / name
        if not inside(out, self.root):
            raise BoardError(f"run name {name!r} resolves outside the runs folder {self.root}: refused", 403)
        if out.exists():
            raise BoardError(f"{out} already exists: give a new run name (or resume that run from its page)", 409)
        return out

    def validate(self, config: Path, overrides: list[str], out: Path, resume: bool = False):
        """The RunConfig the training process will see (a ConfigError is a 400), refused with trust_remote_code."""
        from tunelab.config import load_config

        cfg = load_config(config, [*overrides, f"output_dir={out}", f"resume={str(resume).lower()}"])
        if cfg.model.trust_remote_code:
            raise BoardError("model.trust_remote_code=true: the board does not launch runs that execute Python code "
                             "shipped with a model; set it to false, or start the run yourself with `tunelab train` "
                             "if you trust that code", 400)
        return cfg

    # ---- the cost estimate: `tunelab cost` itself, in a fresh process ----
    def cost(self, config_given, overrides_given) -> dict:
        from tunelab.config import dump_config

        config, overrides = self.config_path(config_given), self.overrides(overrides_given)
        cfg = self.validate(config, overrides, self.root / "(new run)")
        answer = {"config": dump_config(cfg)}
        if cfg.method not in COST_METHODS:
            return answer | {"error": f"`tunelab cost` models {', '.join(COST_METHODS)}; method {cfg.method} has no "
                                      "estimate (between lora's and full's: frozen layers need no grads or AdamW state)"}
        if cfg.model.source == "scratch":
            return answer | {"error": "`tunelab cost` reads a model folder; a scratch model has none"}
        t = cfg.train
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, "-m", "tunelab", "cost", cfg.model.source, "--method", cfg.method,
                       "--batch-size", str(t.batch_size), "--seq-len", str(t.seq_len), "--rank", str(cfg.lora.r),
                       "--quant-block", str(cfg.quant.block_size), "--loss-chunk", str(t.loss_chunk_tokens),
                       *([] if cfg.quant.double_quant else ["--no-double-quant"]), "--json", f"{tmp}/cost.json"]
            try:
                p = subprocess.run(command, cwd=self.cwd, capture_output=True, text=True, timeout=600)
            except subprocess.TimeoutExpired:
                return answer | {"error": "`tunelab cost` took over 10 minutes: no estimate"}
            if p.returncode:
                return answer | {"error": (p.stderr.strip().splitlines() or ["tunelab cost failed"])[-1]}
            rows = json.loads(Path(tmp, "cost.json").read_text())
        return answer | {"command": ["tunelab", *command[3:-2]], "table": p.stdout, "rows": rows,
                         "note": "LoRA rank over all linear layers; fp32; one process" if cfg.method != "full" else
                                 "fp32; one process"}

    # ---- start, stop, resume ----
    def _start(self, name: str, out: Path, command: list[str], new: bool) -> dict:
        with self.lock:
            job = self.jobs.get(name)
            if job and job.proc.poll() is None:
                raise BoardError(f"run {name!r} is already running (pid {job.proc.pid})", 409)
            try:
                out.mkdir(parents=True, exist_ok=not new)
            except FileExistsError:
                raise BoardError(f"{out} already exists: give a new run name", 409) from None
            self.jobs[name] = Job(name, command, self.cwd, out / LOG)
            return self.jobs[name].row()

    def _train(self, config: Path, overrides: list[str], out: Path, resume: bool) -> list[str]:
        return [sys.executable, "-m", "tunelab", "train", str(config), *overrides, f"output_dir={out}",
                f"resume={str(resume).lower()}", "--no-progress"]  # a config file's own `resume:` never counts

    def launch(self, config_given, overrides_given, name_given) -> dict:
        config, overrides = self.config_path(config_given), self.overrides(overrides_given)
        out = self.new_run(name_given)
        self.validate(config, overrides, out)
        return self._start(name_given, out, self._train(config, overrides, out, False), new=True)

    def resume(self, name) -> dict:
        run = locate(self.root, str(name or ""))
        state = run_state(run)
        if state["state"] != "resumable":
            raise BoardError(f"run {name!r} is {state['state']} ({state['why']}): only a stopped run with a complete "
                             "checkpoint can be resumed", 409)
        self.validate(run / "config.yaml", [], run, resume=True)
        return self._start(str(name), run, self._train(run / "config.yaml", [], run, True), new=False)

    def stop(self, name, wait_s: float = 20.0) -> dict:
        """SIGTERM to the run's process group (the trainer and anything it started); waits up to wait_s."""
        job = self.jobs.get(str(name or ""))
        if job is None:
            raise BoardError(f"run {name!r} was not started from this board: stop it where it runs (Ctrl-C, or kill "
                             "the pid its status shows)", 409)
        if job.proc.poll() is None:
            job.stopped = True
            try:
                os.killpg(job.proc.pid, signal.SIGTERM)  # the group's id is the leader's pid (start_new_session)
            except ProcessLookupError:
                pass
            try:
                job.proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                pass
        return job.row()

    def rows(self) -> list[dict]:
        return [j.row() for j in self.jobs.values()]

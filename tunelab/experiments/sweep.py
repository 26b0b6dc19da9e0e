"""Run a grid of training runs from one base config, resumably, and record one result per cell.

    DIR/sweep.json             the grid, the base config and the budget (what `--report` and resumption read)
    DIR/cells/<slug>/cell.yaml the validated config of one cell; cell.json its grid values and extras
    DIR/cells/<slug>/result.json   written last: a cell with it is finished and never re-run
    DIR/results.jsonl, report.md, *.png   regenerated from the result.json files (tunelab.experiments.report)

Equal training budget: every cell sees the same number of training *sequences* (examples): train.max_steps
= round(examples / (batch_size x grad_accum)). For packed pretraining a sequence is exactly seq_len tokens,
so this is also equal tokens (`tokens=` is converted with seq_len); for padded SFT it is equal examples (the
token count then varies only with which examples are drawn). The default budget is the base config's
max_steps x batch_size x grad_accum. Warmup keeps its share of the run (warmup_steps scales with max_steps),
and every cell is evaluated on the same held-out examples (eval_batches x batch_size = `eval_examples`).
Cells save no intermediate checkpoints; their model/checkpoint folders are deleted after the result is
recorded unless keep_outputs is set (a full 135M model is 0.5 GB per cell).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from tunelab.config import dump_config, load_config
from tunelab.errors import ConfigError, TunelabError
from tunelab.experiments import grid


def budget_examples(base, examples: int | None, tokens: int | None) -> int:
    """Sequences per cell: `examples`, or `tokens` / seq_len, or the base run's max_steps x global batch."""
    if examples is not None and tokens is not None:
        raise ConfigError("give the budget as examples or as tokens, not both")
    if tokens is not None:
        return max(1, tokens // base.train.seq_len)
    if examples is not None:
        return examples
    if base.train.max_steps is None:
        raise ConfigError("the base config has no train.max_steps: set it, or give the budget (--examples/--tokens)")
    return base.train.max_steps * base.train.batch_size * base.train.grad_accum


def cell_config(config: str | Path | None, base_overrides: list[str], cell: dict, examples: int | None,
                eval_examples: int, cell_dir: Path):
    """The RunConfig of one cell: base + grid values, max_steps from the budget (None: train.epochs over the
    cell's own data, the equal-epochs rule), warmup scaled, the same eval examples."""
    base = load_config(config, base_overrides)
    cfg = load_config(config, list(base_overrides) + grid.overrides(cell))
    t = cfg.train
    budget = {}
    if examples is not None:
        steps = max(1, round(examples / (t.batch_size * t.grad_accum)))
        budget = {"max_steps": steps, "warmup_steps": round(t.warmup_steps * steps / (base.train.max_steps or steps))}
    return load_config(None, [], base=cfg.model_dump(mode="json") | {
        "output_dir": str(cell_dir), "resume": False,
        "train": t.model_dump(mode="json") | budget | {
            "save_every": 0, "eval_every": 0, "eval_batches": max(1, math.ceil(eval_examples / t.batch_size))},
    })


def plan(out: Path, config: str | Path | None, axes: dict, base_overrides: list[str] = (), examples: int | None = None,
         tokens: int | None = None, eval_examples: int | None = None, extras: dict | None = None,
         epochs: float | None = None) -> list[Path]:
    """Validate every cell's config and write DIR/sweep.json and DIR/cells/<slug>/cell.{yaml,json}.

    `epochs` switches to equal epochs: each cell makes that many passes over its own data (no max_steps).
    A config error in any cell stops here, before anything trains. Returns the cell folders in grid order.
    """
    base = load_config(config, list(base_overrides))
    if epochs is not None:
        if examples is not None or tokens is not None:
            raise ConfigError("give one budget: equal epochs, or equal examples/tokens")
        base_overrides = list(base_overrides) + ["train.max_steps=null", f"train.epochs={epochs!r}"]
        n = None
    else:
        n = budget_examples(base, examples, tokens)
    n_eval = eval_examples or base.train.eval_batches * base.train.batch_size
    cells = grid.expand(axes, base.method)
    dirs = [out / "cells" / grid.slug(cell) for cell in cells]
    cfgs = [cell_config(config, list(base_overrides), cell, n, n_eval, d) for cell, d in zip(cells, dirs)]
    for cell, d, cfg in zip(cells, dirs, cfgs):  # every cell is valid: only now write anything
        d.mkdir(parents=True, exist_ok=True)
        (d / "cell.yaml").write_text(dump_config(cfg))
        (d / "cell.json").write_text(json.dumps({"params": cell, "extras": extras or {}}, indent=1))
    spec = {"config": str(config) if config else None, "overrides": list(base_overrides), "axes": axes,
            "examples": n, "epochs": epochs, "eval_examples": n_eval, "cells": [d.name for d in dirs], "extras": extras or {}}
    (out / "sweep.json").write_text(json.dumps(spec, indent=1))
    return dirs


def is_finished(cell_dir: Path) -> bool:
    return (cell_dir / "result.json").exists()


def _prune(cell_dir: Path) -> None:
    for name in ("checkpoints", "model"):
        shutil.rmtree(cell_dir / name, ignore_errors=True)


def _record(cell_dir: Path, cfg, status: str, summary: dict | None, error: str | None, extra: dict) -> dict:
    meta = json.loads((cell_dir / "cell.json").read_text())
    t = cfg.train
    s = summary or {}
    eval_loss = s.get("eval_loss")
    if status == "ok" and eval_loss is not None and not math.isfinite(eval_loss):
        status = "diverged"
    steps = s.get("steps", t.max_steps)
    result = {"cell": cell_dir.name, "params": meta["params"], "method": cfg.method, "lr": t.lr,
              "batch_size": t.batch_size, "status": status, "steps": steps,
              "examples": steps * t.batch_size * t.grad_accum if steps else None, "eval_loss": eval_loss,
              "first_loss": s.get("first_loss"), "final_loss": s.get("final_loss"), "tokens": s.get("tokens"),
              "seconds": s.get("seconds"), **extra}
    if error:
        result["error"] = error
    (cell_dir / "result.json").write_text(json.dumps(result, indent=1))
    return result


def run_cell(cell_dir: Path, keep_outputs: bool = False) -> dict:
    """Train one planned cell in this process and write its result.json (a diverged run is a result too).

    A run that stops on a non-finite loss/gradient (train.on_nonfinite=stop) is recorded as `diverged`;
    any other TunelabError propagates and the cell stays unfinished.
    """
    from tunelab.train.run import build_model, pick_device, run_training

    cfg = load_config(cell_dir / "cell.yaml")
    extras = json.loads((cell_dir / "cell.json").read_text())["extras"]
    model, tok = build_model(cfg, pick_device(cfg.train.device))
    try:
        summary, model = run_training(cfg, progress=False, model=(model, tok), overwrite=True)  # an unfinished cell restarts
    except TunelabError as e:
        if "non-finite" not in str(e):
            raise
        _prune(cell_dir)
        return _record(cell_dir, cfg, "diverged", None, str(e), {})
    extra = {}
    if extras.get("eval_tasks"):
        from tunelab.experiments.quality import evaluate_tasks

        extra = evaluate_tasks(model, tok, **extras["eval_tasks"])
    if extras.get("example_losses"):  # per eval example, for intervals over examples (experiments.lora_batch)
        from tunelab.experiments.lora_batch import example_losses

        extra["example_losses"] = example_losses(model, tok, cfg)
    if not keep_outputs:
        _prune(cell_dir)
    return _record(cell_dir, cfg, "ok", summary, None, extra)


def _spawn(cell_dir: Path, threads: int, keep_outputs: bool) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "tunelab.experiments.sweep", str(cell_dir)] + (["--keep"] if keep_outputs else [])
    log = open(cell_dir / "log.txt", "w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def run_cells(dirs: list[Path], jobs: int = 1, keep_outputs: bool = False, log=print) -> list[str]:
    """Run every unfinished cell (in this process, or `jobs` subprocesses at a time). Returns failed cells."""
    todo = [d for d in dirs if not is_finished(d)]
    log(f"sweep: {len(dirs)} cells, {len(dirs) - len(todo)} already finished, {len(todo)} to run"
        + (f" in {jobs} processes" if jobs > 1 else ""))
    failed: list[str] = []
    if jobs <= 1:
        for i, d in enumerate(todo):
            t0 = time.time()
            try:
                with open(d / "log.txt", "w") as f, redirect_stdout(f), redirect_stderr(f):
                    r = run_cell(d, keep_outputs)
            except TunelabError as e:
                (d / "error.txt").write_text(str(e) + "\n")
                log(f"[{i + 1}/{len(todo)}] {d.name}: FAILED: {e}")
                failed.append(d.name)
                continue
            log(f"[{i + 1}/{len(todo)}] {d.name}: {r['status']}, eval loss {r['eval_loss']} ({time.time() - t0:.0f} s)")
        return failed
    threads = max(1, (os.cpu_count() or 1) // jobs)
    running: list[tuple[Path, subprocess.Popen]] = []
    queue = list(todo)
    while queue or running:
        while queue and len(running) < jobs:
            d = queue.pop(0)
            running.append((d, _spawn(d, threads, keep_outputs)))
        time.sleep(0.2)
        for d, p in [r for r in running if r[1].poll() is not None]:
            running.remove((d, p))
            if p.returncode == 0 and is_finished(d):
                r = json.loads((d / "result.json").read_text())
                log(f"{d.name}: {r['status']}, eval loss {r['eval_loss']}")
            else:
                log(f"{d.name}: FAILED (exit {p.returncode}); see {d / 'log.txt'}")
                failed.append(d.name)
    return failed


def _main(argv: list[str]) -> int:
    """`python -m tunelab.experiments.sweep CELL_DIR [--keep]`: one cell, as a subprocess of run_cells."""
    try:
        run_cell(Path(argv[0]), keep_outputs="--keep" in argv)
    except TunelabError as e:
        (Path(argv[0]) / "error.txt").write_text(str(e) + "\n")
        print(f"tunelab sweep cell: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

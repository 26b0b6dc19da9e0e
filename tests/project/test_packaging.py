"""The wheel and sdist: `python -m build` makes both; the wheel, installed with --no-deps into a venv that sees
this environment's packages (--system-site-packages: torch is not installed again), runs `tunelab --version`
and a 2-step quickstart on a tiny model from another folder, with the repository nowhere on the path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from tests.support.tiny_run import make_workspace

ROOT = Path(__file__).resolve().parents[2]


def _run(cmd, cwd, env=None, timeout=600):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_wheel_installs_and_runs_without_the_repository(tmp_path):
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside the sources
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("tunelab", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy(ROOT / name, src / name)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, src], tmp_path)  # no download
    wheel, = dist.glob("tunelab-*.whl")
    sdist, = dist.glob("tunelab-*.tar.gz")

    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tunelab").rglob("*.py")}
    data = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tunelab").rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc")}
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    assert modules | data <= in_wheel, sorted((modules | data) - in_wheel)[:5]
    top = sdist.name[: -len(".tar.gz")]
    in_sdist = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    configs = {p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").glob("*.yaml")}
    assert modules | configs | {"pyproject.toml", "README.md"} <= in_sdist, top
    assert not any(n.startswith("tests/") for n in in_sdist)

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", venv], tmp_path)
    py, bin_ = venv / "bin" / "python", venv / "bin" / "tunelab"
    _run([py, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel], tmp_path)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    where = _run([py, "-c", "import tunelab; print(tunelab.__file__)"], elsewhere, env)
    assert Path(where.strip()).is_relative_to(venv), where  # the wheel's copy, not the repository's
    from tunelab import __version__

    assert _run([bin_, "--version"], elsewhere, env).strip() == f"tunelab {__version__}"
    ws = make_workspace(tmp_path / "ws", records=8)
    _run([bin_, "quickstart", "--out", "qs", "--model", ws / "model", "--max-steps", "2", "--train-per-family", "4",
          "--eval-per-family", "2", "--unseen-per-family", "2", "--check-n", "1"], elsewhere, env)
    assert (elsewhere / "qs" / "adapter" / "adapter_model.safetensors").is_file()
    assert '"steps": 2' in (elsewhere / "qs" / "summary.json").read_text()

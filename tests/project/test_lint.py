"""ruff (in the test extra; rules in pyproject.toml's [tool.ruff]) finds nothing in the package, the tests and
the benchmarks: unused or undefined names, import order, whitespace."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_finds_nothing():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "tunelab", "tests", "benchmarks"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "No module named ruff" not in done.stderr, "ruff is in the test extra: pip install -e '.[test]'"
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-1000:]

"""The speed-ups live in tunelab/accel only: no module outside it imports a kernel module. The one door is
tunelab.accel.kernels (the switch: choose, apply, report, the registry); `tunelab doctor` is reached by name
from the CLI's table."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "tunelab"
DOOR = "tunelab.accel.kernels"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of every module a file imports, at the top or inside a function; `from a import b`
    gives a.b (b may be a module or a name in a: both are checked as a.b)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the file's package
                parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)[: -node.level]
                base = ".".join(parts + ([base] if base else []))
            out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return sorted(out)


def _forbidden(name: str) -> bool:
    """A kernel module of tunelab.accel (or a name from one); the package and its door are allowed."""
    inside = name == "tunelab.accel" or name.startswith("tunelab.accel.")
    return inside and name != "tunelab.accel" and not (name == DOOR or name.startswith(DOOR + "."))


def test_no_module_outside_accel_imports_a_kernel_module():
    files = [p for p in PACKAGE.rglob("*.py") if PACKAGE / "accel" not in p.parents]
    assert len(files) > 50  # the walk found the package
    bad = [f"{p.relative_to(PACKAGE.parent)}:{line}: {name}" for p in files for line, name in _imports(p)
           if _forbidden(name)]
    assert not bad, bad


def test_the_check_catches_each_way_of_importing(tmp_path):
    """The check can fail: each spelling of an import of a kernel module is found, the door is not."""
    src = ("import tunelab.accel.fused\n"
           "from tunelab.accel import dequant_c\n"
           "from tunelab.accel.lora import fused_forward\n"
           "def f():\n    from tunelab.accel import ckernels\n"
           "from tunelab.accel import kernels\n"
           "from tunelab.accel.kernels import choose\n")
    probe = tmp_path / "probe.py"
    probe.write_text(src)
    names = [n for _, n in _imports(probe)]
    assert [_forbidden(n) for n in names] == [True, True, True, True, False, False], names

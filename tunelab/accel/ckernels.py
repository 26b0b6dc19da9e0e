"""Small C kernels for the CPU, compiled with the system's C compiler on first use and loaded via ctypes.

PyTorch on CPU runs one pass over memory per op; a few chains of ops that tunelab runs on every training
step are much faster as one loop (4-bit dequantize: tunelab.accel.dequant_c; RMSNorm and SwiGLU:
tunelab.accel.fused).
Each library is compiled once per source, flags, compiler version and instruction-set level into the
user's cache folder (about 1 s with gcc) and written atomically, as Triton and torch.compile build their CPU
pieces. The level is chosen from this CPU's flags (x86-64-v4 with AVX-512, v3 with AVX2 and FMA, v2, or the
baseline), not `-march=native`: a home folder shared between machines, or an image moved to another CPU,
then finds a library of its own level or builds one, and never loads code for instructions its CPU lacks
(SIGILL). `-mtune=native` only orders instructions, so it does not change what a library may run on.
Without a compiler or on Windows, `load()` returns None and callers take their
PyTorch path; why is kept in `problems` (shown by `tunelab doctor`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

# -ffp-contract=off: no fused multiply-add, so each product rounds once as in PyTorch's ops.
# -fopenmp-simd: `#pragma omp simd` vectorises loops (reductions too) without the OpenMP runtime.
FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp-simd", "-shared", "-fPIC"]

# x86-64 micro-architecture levels (the psABI's; GCC >= 11 and clang >= 12 take them as -march), each with
# the /proc/cpuinfo flags it needs beyond the level below (abm is how Linux shows LZCNT).
X86_LEVELS = (
    ("x86-64-v2", {"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"}),
    ("x86-64-v3", {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}),
    ("x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
)

problems: dict[str, str] = {}
"""Why a kernel library is not loaded, by stem (empty when all loaded); `tunelab doctor` prints it.
Process-wide, as the build it describes: a library is built (or found on disk) once per process."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tunelab" / "kernels"


def isa_level(flags: set[str] | None = None) -> str | None:
    """The highest x86-64 level whose flags this CPU has ("x86-64" for the baseline); None off x86-64 or
    where /proc/cpuinfo cannot be read (then no -march is given: the compiler's default)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    if flags is None:
        flags = cpu_flags()
        if not flags:
            return None
    level, need = "x86-64", set()
    for name, more in X86_LEVELS:
        need |= more
        if not need <= flags:
            break
        level = name
    return level


@cache
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def compiler() -> tuple[str, str] | None:
    """(path, first line of `cc --version`) of the C compiler ($CC, else cc or gcc), or None."""
    return _compiler(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))


@cache
def _compiler(cc: str | None) -> tuple[str, str] | None:
    if not cc:
        return None
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return (cc, out.stdout.splitlines()[0] if out.stdout else "") if out.returncode == 0 else None


def build_flags() -> list[str]:
    level = isa_level()
    return FLAGS + ([f"-march={level}", "-mtune=native"] if level else [])


def load(stem: str, source: str, signatures: dict[str, list], extra: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """Compile `source` (once) and load it; set each function's ctypes argtypes; None if impossible, with
    the reason in `problems[stem]`. `extra`: more compiler arguments, after the source file (e.g. "-lm")."""
    problems.pop(stem, None)
    if sys.platform == "win32":
        problems[stem] = "not built on Windows"
        return None
    found = compiler()
    if found is None:
        problems[stem] = "no C compiler (set CC, or install gcc)"
        return None
    cc, version = found
    flags = build_flags()
    key = hashlib.sha256("\0".join([source, *flags, *extra, version, platform.machine()]).encode()).hexdigest()
    level = isa_level() or platform.machine()
    path = cache_dir() / f"{stem}-{level}-{key[:16]}.so"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                src, lib = Path(tmp) / "k.c", Path(tmp) / "k.so"
                src.write_text(source)
                built = subprocess.run([cc, *flags, str(src), "-o", str(lib), *extra], capture_output=True,
                                       text=True, timeout=120)
                if built.returncode:
                    problems[stem] = f"{Path(cc).name} failed: {(built.stderr.strip() or 'no message')[-500:]}"
                    return None
                os.replace(lib, path)  # atomic: a concurrent process sees no library or a whole one
        lib = ctypes.CDLL(str(path))
        for old in path.parent.glob(f"{stem}-*.so"):  # older builds of this level, and of -march=native
            if old != path and (old.name.startswith(f"{stem}-{level}-") or re.fullmatch(rf"{stem}-[0-9a-f]{{16}}\.so", old.name)):
                old.unlink(missing_ok=True)
    except (OSError, subprocess.SubprocessError) as e:
        problems[stem] = f"{type(e).__name__}: {e}"
        return None
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    return lib


@cache
def pool(workers: int) -> ThreadPoolExecutor:
    """Threads for splitting one large kernel call (ctypes lets go of the GIL during each call). Process-wide:
    one pool per size, kept for the process's life (threads idle between calls cost nothing)."""
    return ThreadPoolExecutor(workers, thread_name_prefix="tunelab-kernel")

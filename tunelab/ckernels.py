"""Small C kernels for the CPU, compiled with the system's C compiler on first use and loaded via ctypes.

PyTorch on CPU runs one pass over memory per op; a few chains of ops that tunelab runs on every training
step are much faster as one loop (4-bit dequantize: tunelab.quant.cpu_kernels; RMSNorm and SwiGLU:
tunelab.models.fused).
Each library is compiled once per source, flags, compiler and machine into the user's cache folder (about
1 s with gcc) and written atomically, as Triton and torch.compile build their CPU pieces. Without a
compiler, on Windows, or with TUNELAB_C_KERNELS=0, `load()` returns None and callers take their PyTorch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

# -ffp-contract=off: no fused multiply-add, so each product rounds once as in PyTorch's ops.
# -fopenmp-simd: `#pragma omp simd` vectorises loops (reductions too) without the OpenMP runtime.
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp-simd", "-shared", "-fPIC"]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tunelab" / "kernels"


def load(stem: str, source: str, signatures: dict[str, list], extra: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """Compile `source` (once) and load it; set each function's ctypes argtypes; None if impossible.
    `extra`: more compiler arguments, after the source file (e.g. "-lm")."""
    if os.environ.get("TUNELAB_C_KERNELS", "1") == "0" or sys.platform == "win32":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None
    key = hashlib.sha256("\0".join([source, *FLAGS, *extra, cc, platform.machine(), platform.node()]).encode()).hexdigest()
    path = cache_dir() / f"{stem}-{key[:16]}.so"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                src, lib = Path(tmp) / "k.c", Path(tmp) / "k.so"
                src.write_text(source)
                subprocess.run([cc, *FLAGS, str(src), "-o", str(lib), *extra], check=True, capture_output=True, timeout=120)
                os.replace(lib, path)  # atomic: a concurrent process sees no library or a whole one
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError):
        return None
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    return lib


@cache
def pool(workers: int) -> ThreadPoolExecutor:
    """Threads for splitting one large kernel call (ctypes lets go of the GIL during each call)."""
    return ThreadPoolExecutor(workers, thread_name_prefix="tunelab-kernel")

"""Keep freed memory for the next training step instead of handing it back to the kernel (glibc only).

A training step frees and allocates the same activations every step. glibc's malloc serves blocks above an
adaptive threshold with fresh mmap()s and trims the top of its heap when much of it is free, so every step
page-faults its activations in again and the kernel zeroes each page: about 40,000 faults and 0.1-0.3 s
of system time per 5 s LoRA step of the bundled model (`benchmarks/lora_train_bench.py`, docs/lora.md).
With the threshold pinned at glibc's maximum (32 MiB) and trimming only above 1 GiB free, later steps
reuse the blocks of earlier ones: no faults. What a step freed stays with the process (up to 1 GiB), as
PyTorch's CUDA caching allocator does on GPUs.

The trade-off (docs/lora.md): the peak resident set stays that of glibc's default (freed blocks of one
size do not always fit the next step's), 2.26 GB for a LoRA step of the bundled model at batch 4 x 256.
`MALLOC_MMAP_THRESHOLD_=65536` gives 1.76 GB but maps and unmaps every block each step: 1.24 million
page faults and 4.5-5 s of system time a step. A malloc setting in the environment
(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, glibc.malloc.* in GLIBC_TUNABLES) is the user's choice
and wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit systems
TRIM_THRESHOLD = 1 << 30
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_done = False  # process-wide, as what it records: mallopt sets the process's allocator


def applies() -> bool:
    """Whether reuse_freed_memory may change anything: Linux, and no malloc setting in the environment (the
    user's choice wins). Whether the C library is glibc shows when it is called."""
    user_set = any(k in os.environ for k in USER_SETTINGS) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")
    return sys.platform.startswith("linux") and not user_set


def reuse_freed_memory() -> bool:
    """Set glibc's malloc to keep freed blocks for reuse (once per process). False where the C library is
    not glibc (macOS, musl, Windows) or the environment sets malloc itself: nothing changes then."""
    global _done
    if _done:
        return True
    if not applies():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only  # noqa: B018
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done


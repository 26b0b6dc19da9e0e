"""Hand freed heap memory back to the OS, so a resident-set reading is what is in use (used between the phases
of a merge and before a memory measurement). The opposite setting, keeping freed blocks for the next training
step, is a speed-up and lives in tunelab/accel/malloc.py."""

from __future__ import annotations

import ctypes
import ctypes.util


def release_freed_memory() -> None:
    """Return the pages of freed heap blocks now (glibc's malloc_trim); nothing where the C library is not glibc."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass

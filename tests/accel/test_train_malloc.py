"""reuse_freed_memory: what a training step frees is reused by the next without page faults (glibc)."""

import subprocess
import sys

import pytest

SCRIPT = r"""
import resource, sys, torch
from tunelab.accel.malloc import reuse_freed_memory
if sys.argv[1] == "on":
    assert reuse_freed_memory()
def one_step():  # like a training step: many activations alive at once, then all freed
    xs = [torch.ones(1 << 20) for _ in range(16)]  # 16 x 4 MiB
    del xs
for _ in range(5):  # warm-up: the heap may still grow in steps 2-5 (which, depends on its random start)
    one_step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    one_step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt (Linux)")
def test_later_steps_reuse_freed_memory():
    """5 steps allocate 81,920 pages. glibc's default gives back part of them each step and faults them
    in again (0 to 81,760 faults in 6 runs here); with the setting at most 2 of the 80 blocks do. The warm-up
    is 5 steps: with the setting, the heap grew by 3-7 blocks in one or two of steps 2-5 in 30 runs here (where
    the freed blocks fit the next step's aligned requests depends on the heap's randomised start), never later."""
    assert _faults("on") <= 2048


def test_a_malloc_setting_in_the_environment_wins(monkeypatch):
    from tunelab.accel import malloc

    monkeypatch.setattr(malloc, "_done", False)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert malloc.reuse_freed_memory() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")
    assert malloc.reuse_freed_memory() is False

"""Run one benchmark command while every other python/pytest/torchrun process (also ones started meanwhile)
is paused with SIGSTOP, then resume them (SIGCONT), so a side-by-side timing is not skewed by other jobs.

    python benchmarks/quiet.py python benchmarks/quant_bench.py --device cpu --repeats 9

For shared development machines (this project's 2-core one runs helpers and long sweeps); nothing else
on the machine is touched. Our own ancestors and the command's own subprocesses keep running.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

PATTERN = re.compile(rb"python|pytest|torchrun|ruff")


def parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def main() -> int:
    child = subprocess.Popen(sys.argv[1:])
    mine, stopped = {os.getpid(), child.pid}, set()
    p = os.getppid()
    while p > 1:  # our own ancestors (shells whose command line says "python") are left alone
        mine.add(p)
        p = parent(p)

    def is_mine(pid: int) -> bool:
        chain = []
        while pid > 1:
            if pid in mine:
                mine.update(chain)
                return True
            chain.append(pid)
            pid = parent(pid)
        return False

    try:
        while child.poll() is None:
            for name in os.listdir("/proc"):
                if not name.isdigit() or int(name) in stopped or int(name) in mine:
                    continue
                pid = int(name)
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read()
                except OSError:
                    continue
                if PATTERN.search(cmd) and not is_mine(pid):
                    try:
                        os.kill(pid, signal.SIGSTOP)
                        stopped.add(pid)
                    except OSError:
                        pass
            time.sleep(0.5)
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass
        print(f"[quiet] paused {len(stopped)} other processes while it ran", file=sys.stderr)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())

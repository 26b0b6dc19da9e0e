"""`status.json` in a run folder: what the run's process is doing now, for `tunelab board` and scripts.

    {"state": "running" | "finished" | "failed", "pid": 1234, "host": "box", "started": 1.7e9,
     "heartbeat": 1.7e9, "step": 12, "total_steps": 40, "error": "..." (failed only)}

Written by rank 0 only, atomically (a temporary file renamed over the old one), so a reader never sees half a
file. A process killed outright (SIGKILL, power loss) cannot write "failed": its file still says "running"
with a pid that no longer exists, which the board reads as stopped (see `tunelab.board.runs.run_state`).
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

NAME = "status.json"


def _write(out: Path, record: dict) -> None:
    path = Path(out) / NAME
    tmp = path.with_name(f".{NAME}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def read(out: Path) -> dict | None:
    """The run's status record, or None when there is none (a run older than this file) or it is unreadable."""
    try:
        record = json.loads((Path(out) / NAME).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


class Status:
    """The status file of one training process; `beat(step)` after every optimizer step."""

    def __init__(self, out: Path, total_steps: int | None = None, step: int = 0):
        self.out = Path(out)
        self.record = {"state": "running", "pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                       "heartbeat": time.time(), "step": step, "total_steps": total_steps}
        _write(self.out, self.record)

    def beat(self, step: int, total_steps: int | None = None) -> None:
        self.record.update(step=step, heartbeat=time.time())
        if total_steps is not None:
            self.record["total_steps"] = total_steps
        _write(self.out, self.record)

    def end(self, state: str, error: str | None = None) -> None:
        self.record.update(state=state, heartbeat=time.time())
        if error:
            self.record["error"] = error
        _write(self.out, self.record)


_current: dict[str, Status] = {}  # run folder -> its Status while `tracking` is open in this process


@contextmanager
def tracking(out: Path, enabled: bool = True):
    """Status "running" while the block runs, then "finished", or "failed" with the error's first line."""
    if not enabled:
        yield None
        return
    st = _current[str(out)] = Status(out)
    try:
        yield st
    except BaseException as e:
        st.end("failed", (f"{type(e).__name__}: {e}".splitlines() or [""])[0][:500])
        raise
    else:
        st.end("finished")
    finally:
        _current.pop(str(out), None)


def beat(out: Path, step: int, total_steps: int) -> None:
    """Record progress for the run in `out` when `tracking` is open for it in this process (else nothing)."""
    st = _current.get(str(out))
    if st is not None:
        st.beat(step, total_steps)

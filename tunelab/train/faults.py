"""A test seam for crash trials: `TUNELAB_FAULT=site:n` kills this process with SIGKILL the n-th time `site`
is reached. A no-op unless the variable is set.

Sites (where a real crash hurts most): `step` (after an optimizer step, before its checkpoint), and inside
a checkpoint write `ckpt_weights`, `ckpt_optimizer` (after each file), `ckpt_manifest` (files written, no
manifest yet), `ckpt_rename` (manifest written, folder not yet renamed into place), `ckpt_prune` (renamed,
older checkpoints not yet deleted). tests/train/test_reliability_crash.py draws seeded (site, n) pairs.
"""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}  # process-wide, as what it counts: the times this process reached each site


def point(site: str) -> None:
    spec = os.environ.get("TUNELAB_FAULT")
    if not spec:
        return
    name, _, n = spec.partition(":")
    if name == site:
        _hits[site] = _hits.get(site, 0) + 1
        if _hits[site] == int(n or 1):
            os.kill(os.getpid(), signal.SIGKILL)

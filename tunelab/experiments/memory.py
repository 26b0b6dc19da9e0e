"""Memory as tensors hold it, independent of the allocator: the numbers the analytic cost model counts.

The resident set (RSS) also holds what the C allocator keeps after tensors are freed, which depends on
the allocator and its settings (docs/experiments.md); these functions count tensors only."""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage alive now, each storage counted once (views share one)."""
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type != "cpu" or obj.is_meta:
                continue
            storage = obj.untyped_storage()
        except (ReferenceError, RuntimeError):  # weak proxies; tensors without a storage (e.g. sparse)
            continue
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


def live_peak_bytes(fn: Callable[[], object]) -> int:
    """The largest total of tensors alive at once while `fn()` runs, above those alive before it: torch's
    memory profiler's timeline (a private API, torch 2.13), tensors created minus tensors destroyed in time
    order. The allocator's own overhead is not in it."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    live = peak = 0
    for _, action, _, size in sorted(prof._memory_profile().timeline, key=lambda row: row[0]):
        live += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, live)
    return peak

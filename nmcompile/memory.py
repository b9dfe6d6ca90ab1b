"""Peak memory of a step, measured: the largest number of tensor bytes alive at once while it runs.

Not a sum of allocations: a step that allocates 4 MiB, then 8 MiB, frees the 4 and allocates 2 more
peaks at 12 MiB, not 14. The measurement runs the step under ``torch.profiler`` with
``profile_memory=True``; each of its ``[memory]`` events carries the allocator's running total of
bytes allocated since profiling began and not yet freed ("Total Allocated"), so the maximum over the
events, less the total when the step began, is the peak of the step's own live bytes. The caller adds
what was alive when the step began: ``peak_bytes(step, before=tensor_bytes(...))``. A block allocated
before that and freed during the step lowers the total only if it was allocated under an earlier
profiled step; one allocated before any profiling keeps counting (the profiler warns that it cannot
size it), so the result is then an upper bound, high by at most the bytes of such blocks freed before
the peak. Bytes are the allocator's: on CPU, a tensor's
storage, with no rounding to blocks beyond the allocator's own alignment.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Callable, Iterable

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the storages of ``tensors``, each storage counted once (views share theirs). A tensor
    subclass that wraps others (torchao's 8-bit optimizer state: codes and scales) counts what it wraps."""
    seen: dict = {}

    def add(t: torch.Tensor) -> None:
        if is_traceable_wrapper_subclass(t):
            for name in t.__tensor_flatten__()[0]:
                add(getattr(t, name))
            return
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()

    for t in tensors:
        add(t)
    return sum(seen.values())


def peak_bytes(step: Callable[[], object], before: int = 0) -> tuple[object, int]:
    """(``step()``'s result, ``before`` plus the peak of the bytes the step allocated and had not yet
    freed at any moment), on the CPU allocator."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        result = step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0]
    if not memory:
        return result, before
    # the running total also holds blocks of earlier profiled steps still alive: measured from where it stood
    start = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return result, before + max(0, max(m["Total Allocated"] for m in memory) - start)

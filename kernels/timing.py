"""What GEMMs and the nm ops cost on this machine: measured once, then cached.

The per-machine cost model behind the ``dense_if_faster`` option. Which is faster, an int8 GEMM with the
quantizers that feed it or the dense GEMM in the graph's own dtype, depends on the machine far more than on
FLOPs: on a 2-core AMD EPYC without AMX bf16 GEMMs are emulated and int8 wins by 2×; on an Intel Xeon with
AMX both run on tiles, and the int8 GEMM is 0.6–1.3× the bf16 one depending on the shape. So it is measured:

- a GEMM: ``torch.mm`` in its dtype, or ``torch._int_mm`` on int8 codes laid out as the lowering feeds
  them, at the exact shape, the median of a few calls;
- an op that runs once per element (a quantizer, the int8 GEMM's rescaling): seconds per element, measured
  on one tensor of 4M elements.

Results are kept per process and on disk (``timings-<key>.json`` beside the C++ kernels, keyed by the CPU's
flags, the thread count and torch's version); with ``torch._inductor.config.force_disable_caches`` they are
measured once per process and not stored, as the kernels are built once per process then. Timing runs on
real tensors outside any fake-tensor mode, autocast and autograd, so it may be asked while a graph is traced.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import statistics
import threading
import time
from typing import Callable

import torch

from . import cpu

_ELEMENTS = 1 << 22  # the tensor an elementwise op is timed on: 4M elements, well outside the caches
_lock = threading.Lock()
_memory: dict = {}
_loaded: set = set()


def cache_file() -> pathlib.Path:
    """The file this machine's timings are kept in (with caches disabled: only in this process)."""
    blob = "\n".join([cpu.cpu_flags(), str(torch.get_num_threads()), torch.__version__])
    return cpu.cache_root() / f"timings-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.json"


def _load(path: pathlib.Path) -> None:
    if path in _loaded:
        return
    _loaded.add(path)
    _memory.setdefault(path, {})
    if cpu.caches_disabled():
        return
    try:
        _memory[path].update(json.loads(path.read_text()))
    except (OSError, ValueError):  # none yet, or unreadable: measured again
        pass


def _store(path: pathlib.Path) -> None:
    if cpu.caches_disabled():
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_memory[path], indent=0, sort_keys=True))
        os.replace(tmp, path)  # atomic: a concurrent process reads the old file or the new one
    except OSError:  # a read-only cache: measured again next time
        pass


def _median_seconds(fn: Callable[[], object], calls: int = 5) -> float:
    fn()  # warm-up: oneDNN picks and caches its kernel on the first call
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measured(name: str, make: Callable[[], Callable[[], object]]) -> float:
    """Seconds of the call ``make()`` returns (``make`` builds its inputs), cached under ``name``."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    path = cache_file()
    with _lock:
        _load(path)
        table = _memory[path]
        if name not in table:
            with unset_fake_temporarily(), torch.no_grad(), torch.autocast("cpu", enabled=False):
                table[name] = _median_seconds(make())
            _store(path)
        return table[name]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def mm_seconds(m: int, n: int, k: int, dtype: torch.dtype) -> float:
    """One dense [m, k] @ [k, n] GEMM in ``dtype`` (row-major operands)."""
    def make():
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        return lambda: torch.mm(a, b)

    return measured(f"mm {m}x{n}x{k} {_dtype_name(dtype)}", make)


def int_mm_seconds(m: int, n: int, k: int, b_transposed: bool) -> float:
    """One ``torch._int_mm`` of [m, k] @ [k, n] int8 codes; ``b_transposed``: the right operand is stored
    [n, k] (a transposed weight), as the forward GEMM of a Linear layer reads it."""
    def make():
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
        b = torch.randint(-127, 128, (n, k) if b_transposed else (k, n), dtype=torch.int8)
        b = b.t() if b_transposed else b
        return lambda: torch._int_mm(a, b)

    return measured(f"int_mm {m}x{n}x{k}{' bT' if b_transposed else ''}", make)


def per_element_seconds(name: str, dtype: torch.dtype, op: Callable[[torch.Tensor], object]) -> float:
    """Seconds per element of ``op`` applied to a [1024, 4096] tensor of ``dtype`` (``name`` says what
    ``op`` is, for the cache; an integer dtype holds small random integers)."""
    def make():
        x = (torch.randn(1024, _ELEMENTS // 1024) * 1000).to(dtype)
        return lambda: op(x)

    return measured(f"{name} {_dtype_name(dtype)} per element", make) / _ELEMENTS

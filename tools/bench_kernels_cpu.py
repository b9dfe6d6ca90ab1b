"""The nm ops' CPU kernels against a copy of the same tensor and against their portable torch math.

    python tools/bench_kernels_cpu.py [--size 4096x2048] [--reps 25] [--out kernels-cpu.json]

Per op and layout: the CPU kernel (kernels/nm_cpu.cpp), the portable torch math it follows (what
other devices run, or CPUs without a C++ compiler), and ``x.clone()``, each the minimum of
``--reps`` timed calls in one process (minimum, not median: on a shared 2-core machine the noise
only ever adds time). The ratio kernel / copy says how close to memory-bound the kernel is.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

import nmcompile  # noqa: F401  (registers torch.ops.nm.*)
from nmcompile.kernels import cpu, ops

SEED, SEEDS = torch.tensor(2**40 + 7), torch.tensor([11, 12])


def cases(x: torch.Tensor):
    """(label, call): the ops as the graph pass calls them, on x and on its transpose (a wgrad operand)."""
    xt = x.t()
    yield "mvue 2:4, groups along the outer dim (wgrad of dY)", lambda: torch.ops.nm.mvue(xt, SEED, 2, 4, 1)
    yield "mvue 2:4, groups along the contiguous dim (dgrad)", lambda: torch.ops.nm.mvue(x, SEED, 2, 4, 1)
    yield "mvue 1:2 (wgrad)", lambda: torch.ops.nm.mvue(xt, SEED, 1, 2, 1)
    yield "mvue 3:8 (wgrad)", lambda: torch.ops.nm.mvue(xt, SEED, 3, 8, 1)
    yield "greedy 2:4 (dgrad)", lambda: torch.ops.nm.greedy(x, 2, 4, 1)
    yield "luq 4-bit", lambda: torch.ops.nm.luq(x, SEED.view(1), 4, "strict")
    yield "luq 4-bit, smp 2", lambda: torch.ops.nm.luq(x, SEEDS, 4, "strict")
    yield "sawb 4-bit", lambda: torch.ops.nm.sawb(x, 4)


def best_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="4096x2048", help="rows x cols of the fp32 tensor (default 4096x2048)")
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--out", default=None, metavar="FILE.json")
    args = ap.parse_args(argv)
    rows_, cols = (int(s) for s in args.size.lower().split("x"))
    if not cpu.available():
        print(f"the CPU kernels are not available: {cpu.failure()}", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    x = torch.randn(rows_, cols)
    copy_ms = best_ms(x.clone, args.reps)
    rows = []
    for label, call in cases(x):
        kernel_ms = best_ms(call, args.reps)
        original = ops._on_cpu_kernels
        ops._on_cpu_kernels = lambda *a: False  # the portable torch math, same op, same inputs
        try:
            torch_ms = best_ms(call, max(3, args.reps // 5))
        finally:
            ops._on_cpu_kernels = original
        rows.append({"op": label, "kernel_ms": kernel_ms, "torch_math_ms": torch_ms, "copy_ms": copy_ms})
        print(f"{label:52s} kernel {kernel_ms:7.1f} ms  torch math {torch_ms:8.1f} ms  copy {copy_ms:5.1f} ms",
              file=sys.stderr, flush=True)
    meta = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "size": [rows_, cols], "dtype": "float32", "cpu_kernel_flags": " ".join(cpu.FLAGS)}
    print(f"\n{rows_}×{cols} fp32 ({rows_ * cols / 1e6:.1f}M elements), torch {meta['torch']}, "
          f"{meta['threads']} threads; minimum of {args.reps} calls\n")
    print("| op | CPU kernel (ms) | kernel / copy | portable torch math (ms) | torch math / kernel |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['op']} | {r['kernel_ms']:.1f} | {r['kernel_ms'] / r['copy_ms']:.2f} | "
              f"{r['torch_math_ms']:.1f} | {r['torch_math_ms'] / r['kernel_ms']:.1f} |")
    print(f"| `x.clone()` | {copy_ms:.1f} | 1.00 | | |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

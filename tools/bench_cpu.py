"""Step-time ratio backend nm / backend inductor on CPU, measured side by side in one run.

    python tools/bench_cpu.py [--steps 30] [--out BENCHMARKS-cpu.json]

For each model and option set: compile both backends, warm up, then time forward+backward steps
alternating between the two (so drift hits both alike) and report medians and their ratio. Also
counts the kernels in Inductor's generated backward code with and without the nm pass: fused nm
math adds no kernel per op (DESIGN.md §7).
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time

import torch
import torch.nn as nn
from torch._inductor.utils import run_and_get_code

import nmcompile  # noqa: F401  (ops registered; backend found through the entry point anyway)


def models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512))
    yield "MLP 512-2048-512, 4096 tokens", mlp, torch.randn(4096, 512)
    layer = nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True)
    yield "TransformerEncoderLayer d=256, 8x256 tokens", layer, torch.randn(8, 256, 256)


OPTIONS = {
    "mvue 2:4 wgrad": {"sparsity": "2:4"},
    "luq4 + sawb4": {"quant": "luq", "fwd_quant": "sawb"},
    "mvue 2:4 + luq4": {"sparsity": "2:4", "quant": "luq"},
}


def step(f, x):
    out = f(x)
    out.float().pow(2).mean().backward()


def kernel_counts(model, x, backend, options):
    torch._dynamo.reset()
    f = torch.compile(model, backend=backend, options=options) if options else torch.compile(model, backend=backend)
    with torch._inductor.config.patch(force_disable_caches=True):
        _, codes = run_and_get_code(step, f, x)
    backward = codes[-1]
    return {"fused_kernels": len(re.findall(r"^cpp_fused_\w+ = ", backward, re.M)),
            "extern_calls": len(re.findall(r"extern_kernels\.\w+\(", backward))}


def timed(f, x, model):
    model.zero_grad(set_to_none=True)
    t = time.perf_counter()
    step(f, x)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for name, model, x in models():
        base = torch.compile(model, backend="inductor")
        for _ in range(3):
            timed(base, x, model)
        for label, opts in OPTIONS.items():
            nm = torch.compile(model, backend="nm", options=opts)
            for _ in range(3):
                timed(nm, x, model)
            t_base, t_nm = [], []
            for _ in range(args.steps):
                t_base.append(timed(base, x, model))
                t_nm.append(timed(nm, x, model))
            row = {"model": name, "options": label, "inductor_ms": 1e3 * statistics.median(t_base),
                   "nm_ms": 1e3 * statistics.median(t_nm)}
            row["ratio"] = row["nm_ms"] / row["inductor_ms"]
            row["kernels_inductor"] = kernel_counts(model, x, "inductor", None)
            row["kernels_nm"] = kernel_counts(model, x, "nm", opts)
            rows.append(row)
            print(f"{name:45s} {label:18s} inductor {row['inductor_ms']:8.2f} ms  nm {row['nm_ms']:8.2f} ms  "
                  f"ratio {row['ratio']:.3f}  bwd kernels {row['kernels_inductor']} -> {row['kernels_nm']}",
                  file=sys.stderr, flush=True)
            torch._dynamo.reset()
            base = torch.compile(model, backend="inductor")
            for _ in range(2):
                timed(base, x, model)
    meta = {"torch": torch.__version__, "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "steps": args.steps}
    print(json.dumps({"meta": meta, "rows": rows}, indent=2))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The GEMMs of ``lowering="native"`` against dense bf16, on a GPU: exact FP8, 2:4 (cuSPARSELt), both.

    python tools/bench_gemm.py [--quick] [--out bench-gemm.json]      # CUDA
    python tools/bench_gemm.py --smoke                                # tiny shapes on CPU (tests the script)

For a transformer MLP layer of width d (ff = 4d) over T tokens, the three GEMMs of its up-projection:
forward Y = X·Wᵀ (M=T, N=ff, K=d), dgrad dX = δ·W (M=T, N=d, K=ff) and wgrad dW = δᵀ·X (M=ff,
N=d, K=T), each with its operands in the layouts the joint graph gives them (δᵀ and X of the
wgrad are transposed views). Variants, each timed as the median of ``triton.testing.do_bench`` over
inputs rotated among three sets (so no run reads another's operands from L2):

- ``dense``: torch.mm in bf16 (the baseline of every ratio);
- ``fp8``: ``nm.fp8_mm`` on float8 codes made beforehand; ``fp8+quant``: with the quantizers that make
  them (LUQ of δ, SAWB of W or X; forward: SAWB of both);
- ``2:4``: ``nm.sparse24_mm`` on a pruned δ (cuSPARSELt compress + sparse GEMM); ``2:4+prune``: with MVUE;
- ``2:4 fp8`` and ``2:4 fp8+prune+quant``: the same on float8 codes.

Kernels: MVUE 2:4, LUQ, SAWB and their float8 forms on δ (T × ff), as a fraction of a
device-to-device copy of δ measured in the same run (bytes read + written over time, each over the
copy's). Prints Markdown tables (ratios vs dense; the issue's targets marked) and writes JSON.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
import traceback
from typing import Callable, Optional

import torch

import nmcompile  # noqa: F401  (registers torch.ops.nm.*)
from nmcompile.kernels.gemm import cusparselt_version

nm = torch.ops.nm
SHAPES = [(768, 8192), (1024, 16384), (2048, 16384), (2048, 32768), (4096, 16384), (4096, 32768)]
QUICK = [(768, 8192), (2048, 16384), (4096, 16384), (4096, 32768)]
SMOKE = [(64, 256)]
ROTATE = 3


def timer(device: torch.device) -> Callable[[Callable], float]:
    """Median milliseconds of ``fn()``: do_bench on CUDA, a wall clock elsewhere."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")

    def wall(fn):
        fn()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return wall


def rotating(make: Callable[[], tuple]) -> Callable[[Callable], Callable[[], object]]:
    """``ROTATE`` input sets from ``make``; wraps f(*inputs) into a call that takes the next set."""
    sets = [make() for _ in range(ROTATE)]

    def bind(f):
        cycle = itertools.cycle(sets)
        return lambda: f(*next(cycle))

    return bind


def seeds(device, count=1):
    return torch.randint(0, 2**62, (count,), device=device)


def gemm_variants(role: str, d: int, tokens: int, device: torch.device) -> dict:
    """name -> (function of the inputs, input maker) for one GEMM of the layer."""
    ff = 4 * d
    bf16 = torch.bfloat16

    def grad_and_other():
        delta = torch.randn(tokens, ff, device=device, dtype=bf16)
        if role == "dgrad":
            return delta, torch.randn(ff, d, device=device, dtype=bf16)  # δ (T×ff) · W (ff×d)
        return delta.t(), torch.randn(tokens, d, device=device, dtype=bf16)  # δᵀ (ff×T) · X (T×d)

    def forward_operands():
        return torch.randn(tokens, d, device=device, dtype=bf16), torch.randn(ff, d, device=device, dtype=bf16).t()

    def codes(x, kind):
        return nm.sawb_fp8(x, 4) if kind == "sawb" else nm.luq_fp8(x, seeds(x.device), 4, "strict")

    def pruned(g):
        return nm.mvue(g, seeds(g.device)[0], 2, 4, 1)

    out = {"dense": (lambda a, b: torch.mm(a, b), None)}
    if role == "fwd":
        make = forward_operands
        out["dense"] = (out["dense"][0], make)
        out["fp8"] = (lambda a, sa, b, sb: nm.fp8_mm(a, sa, b, sb, None, bf16),
                      lambda: (*codes(make()[0], "sawb"), *codes(make()[1], "sawb")))
        out["fp8+quant"] = (lambda a, b: nm.fp8_mm(*codes(a, "sawb"), *codes(b, "sawb"), None, bf16), make)
        return out
    make = grad_and_other
    out["dense"] = (out["dense"][0], make)

    def fp8_inputs():
        g, b = make()
        return (*codes(g, "luq"), *codes(b, "sawb"))

    def sparse_inputs():
        g, b = make()
        return pruned(g), b

    def sparse_fp8_inputs():
        g, b = make()
        return (*codes(pruned(g), "luq"), *codes(b, "sawb"))

    out["fp8"] = (lambda a, sa, b, sb: nm.fp8_mm(a, sa, b, sb, None, bf16), fp8_inputs)
    out["fp8+quant"] = (lambda g, b: nm.fp8_mm(*codes(g, "luq"), *codes(b, "sawb"), None, bf16), make)
    out["2:4"] = (lambda g, b: nm.sparse24_mm(g, b, None, None, bf16), sparse_inputs)
    out["2:4+prune"] = (lambda g, b: nm.sparse24_mm(pruned(g), b, None, None, bf16), make)
    out["2:4 fp8"] = (lambda a, sa, b, sb: nm.sparse24_mm(a, b, sa, sb, bf16), sparse_fp8_inputs)

    def all_in(g, b):
        (a, sa), (bc, sb) = codes(pruned(g), "luq"), codes(b, "sawb")
        return nm.sparse24_mm(a, bc, sa, sb, bf16)

    out["2:4 fp8+prune+quant"] = (all_in, make)
    return out


def kernel_variants(d: int, tokens: int, device: torch.device) -> dict:
    """name -> (function of δ, bytes it must move) for the prune/quantize kernels."""
    ff = 4 * d
    n = tokens * ff
    return {
        "copy": (lambda x: x.clone(), 4 * n),
        "mvue 2:4": (lambda x: nm.mvue(x, seeds(device)[0], 2, 4, 1), 4 * n),
        "luq4": (lambda x: nm.luq(x, seeds(device), 4, "strict"), 4 * n),
        "sawb4": (lambda x: nm.sawb(x, 4), 4 * n),
        "luq4 → fp8": (lambda x: nm.luq_fp8(x, seeds(device), 4, "strict"), 3 * n),
        "sawb4 → fp8": (lambda x: nm.sawb_fp8(x, 4), 3 * n),
    }


def run(shapes: list, device: torch.device, save: Callable[[list], None]) -> list:
    """All rows; ``save(rows)`` after each shape, so a run cut short keeps what it measured."""
    time_ms = timer(device)
    rows = []
    for d, tokens in shapes:
        for role in ("fwd", "dgrad", "wgrad"):
            variants = gemm_variants(role, d, tokens, device)
            m, n, k = {"fwd": (tokens, 4 * d, d), "dgrad": (tokens, d, 4 * d), "wgrad": (4 * d, d, tokens)}[role]
            for name, (fn, make) in variants.items():
                row = {"d": d, "tokens": tokens, "role": role, "M": m, "N": n, "K": k, "variant": name}
                try:
                    row["ms"] = time_ms(rotating(make)(fn))
                    row["tflops"] = 2 * m * n * k / row["ms"] / 1e9
                except Exception as err:  # noqa: BLE001  (one kernel failing must not end the run)
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                rows.append(row)
                print(f"  d={d} T={tokens} {role:5s} {name:22s} {row.get('ms', float('nan')):9.3f} ms "
                      f"{row.get('error', '')}", file=sys.stderr, flush=True)
                _free(device)
        delta_sets = [torch.randn(tokens, 4 * d, device=device, dtype=torch.bfloat16) for _ in range(ROTATE)]
        for name, (fn, nbytes) in kernel_variants(d, tokens, device).items():
            cycle = itertools.cycle(delta_sets)
            row = {"d": d, "tokens": tokens, "role": "kernel", "variant": name, "bytes": nbytes}
            try:
                row["ms"] = time_ms(lambda: fn(next(cycle)))
                row["gbps"] = nbytes / row["ms"] / 1e6
            except Exception as err:  # noqa: BLE001
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            rows.append(row)
            ms = row.get("ms", float("nan"))
            print(f"  d={d} T={tokens} kernel {name:14s} {ms:9.3f} ms", file=sys.stderr, flush=True)
        del delta_sets
        _free(device)
        save(rows)
    return rows


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def tables(rows: list) -> str:
    """Markdown: per GEMM the ratio of each variant to dense; per shape the kernels' copy fraction."""
    out = []
    gemm_names = ["fp8", "fp8+quant", "2:4", "2:4+prune", "2:4 fp8", "2:4 fp8+prune+quant"]
    out.append("| d | tokens | GEMM | M×N×K | dense ms | " + " | ".join(f"{n} ×" for n in gemm_names) + " |")
    out.append("|---|---|---|---|---|" + "---|" * len(gemm_names))
    keyed = {(r["d"], r["tokens"], r["role"], r["variant"]): r for r in rows}
    for d, tokens, role in dict.fromkeys((r["d"], r["tokens"], r["role"]) for r in rows if r["role"] != "kernel"):
        dense = keyed.get((d, tokens, role, "dense"), {})
        cells = []
        for name in gemm_names:
            r = keyed.get((d, tokens, role, name))
            if r is None:
                cells.append("")
            elif "ms" not in r or "ms" not in dense:
                cells.append("error")
            else:
                ratio = dense["ms"] / r["ms"]
                target = _target(name, role, d, tokens)
                cells.append(f"{ratio:.2f}" + (f" ({'✓' if ratio >= target else '✗'} ≥{target})" if target else ""))
        out.append(
            f"| {d} | {tokens} | {role} | {dense.get('M')}×{dense.get('N')}×{dense.get('K')} | "
            f"{dense.get('ms', float('nan')):.3f} | " + " | ".join(cells) + " |"
        )
    out.append("")
    kernel_names = [r["variant"] for r in rows if r["role"] == "kernel" and r["variant"] != "copy"]
    kernel_names = list(dict.fromkeys(kernel_names))
    out.append("| d | tokens | copy GB/s | " + " | ".join(f"{n} (of copy)" for n in kernel_names) + " |")
    out.append("|---|---|---|" + "---|" * len(kernel_names))
    for d, tokens in dict.fromkeys((r["d"], r["tokens"]) for r in rows if r["role"] == "kernel"):
        copy = keyed.get((d, tokens, "kernel", "copy"), {})
        cells = []
        for name in kernel_names:
            r = keyed.get((d, tokens, "kernel", name), {})
            if "gbps" in r and "gbps" in copy:
                frac = r["gbps"] / copy["gbps"]
                cells.append(f"{frac:.0%} ({'✓' if frac >= 0.7 else '✗'} ≥70%)")
            else:
                cells.append("error")
        out.append(f"| {d} | {tokens} | {copy.get('gbps', float('nan')):.0f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _target(name: str, role: str, d: int, tokens: int) -> Optional[float]:
    """The issue's targets (same-run ratios on an H100/H200)."""
    if name == "fp8+quant" and d >= 2048:
        return 1.5
    if name == "2:4+prune" and role == "wgrad" and d >= 2048 and tokens >= 16384:
        return 1.15
    return None


def meta(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "device": str(device), "cusparselt": cusparselt_version()}
    if device.type == "cuda":
        import triton

        info.update(
            gpu=torch.cuda.get_device_name(device),
            capability=list(torch.cuda.get_device_capability(device)),
            triton=triton.__version__,
            cuda=torch.version.cuda,
        )
    return info


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"only {QUICK}")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script, measures nothing")
    p.add_argument("--out", help="write rows and meta data as JSON here")
    args = p.parse_args(argv)
    if args.smoke:
        device, shapes = torch.device("cpu"), SMOKE
    elif not torch.cuda.is_available():
        print("bench_gemm: no CUDA device; nothing measured (use --smoke to check the script on CPU)")
        if args.out:
            json.dump({"skipped": "no CUDA device", "meta": meta(torch.device("cpu"))}, open(args.out, "w"), indent=1)
        return 0
    else:
        device, shapes = torch.device("cuda"), QUICK if args.quick else SHAPES
    info = meta(device)

    def save(rows: list) -> None:
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"meta": info, "rows": rows}, f, indent=1)

    rows: list = []
    try:
        rows = run(shapes, device, save)
    except Exception:  # noqa: BLE001  (keep what was measured)
        traceback.print_exc()
    print(f"bench_gemm on {info.get('gpu', info['device'])}, torch {info['torch']}, cuSPARSELt {info['cusparselt']}\n")
    print(tables(rows))
    return 0 if rows and not all("error" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

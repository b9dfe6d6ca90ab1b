"""The GEMMs of the native lowering against dense bf16: exact INT8 and FP8, 2:4 (cuSPARSELt), both.

    python tools/bench_gemm.py [--quick] [--out bench-gemm.json]      # CUDA
    python tools/bench_gemm.py --cpu [--quick] [--out bench-gemm-cpu.json]   # CPU: int8 vs bf16 and fp32
    python tools/bench_gemm.py --smoke                                # tiny shapes on CPU (tests the script)

For a transformer MLP layer of width d (ff = 4d) over T tokens, the three GEMMs of its up-projection:
forward Y = X·Wᵀ (M=T, N=ff, K=d), dgrad dX = δ·W (M=T, N=d, K=ff) and wgrad dW = δᵀ·X (M=ff,
N=d, K=T), each with its operands in the layouts the joint graph gives them (δᵀ and X of the
wgrad are transposed views). Variants, each timed as the median of ``triton.testing.do_bench`` over
inputs rotated among three sets (so no run reads another's operands from L2):

- ``dense``: torch.mm in bf16 (the baseline of every ratio);
- ``int8``: the int8 GEMM on int8 codes made beforehand; ``int8+quant``: with the quantizers that make
  them (LUQ of δ, SAWB of W or X; forward: SAWB of both); both compiled by Inductor, as the native
  lowering puts them in a training graph (``gemm.int8_gemm``: ``_int_mm`` and one fused scaling pass);
- ``fp8``: ``nm.fp8_mm`` on float8 codes made beforehand; ``fp8+quant``: with the quantizers that make
  them;
- ``2:4``: ``nm.sparse24_mm`` on a pruned δ (cuSPARSELt compress + sparse GEMM); ``2:4+prune``: with MVUE;
- ``2:4 fp8`` and ``2:4 fp8+prune+quant``: the same on float8 codes.

Kernels: MVUE 2:4, LUQ, SAWB and their float8 and int8 forms on δ (T × ff), as a fraction of a
device-to-device copy of δ measured in the same run (bytes read + written over time, each over the
copy's). Prints Markdown tables (ratios vs dense; the issue's targets marked) and writes JSON.

``--cpu``: the same three GEMMs on the CPU with fp32 operands, as a CPU user's fp32 training graph has
them: ``dense`` torch.mm in bf16 on bf16 operands made beforehand (the casts not counted: generous to
bf16), ``fp32`` torch.mm in fp32, ``int8`` and ``int8+quant`` (the quantizers reading the fp32 operands,
the output in fp32), ``onednn u8s8`` (oneDNN's int8 linear on the same codes, the right operand packed in
each call, the scaling inside the kernel: a probe of a faster int8 GEMM, used only where it gives the integer
product exactly), each the median of 5 wall-clock runs after one warm-up; the kernels on fp32 δ
(bytes counted: the input read once and the output written once). Targets: int8+quant ≥ 1.3× bf16 and
≥ 4× fp32 for M, N, K ≥ 1024; the quantizers ≥ 70% of copy bandwidth.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import sys
import time
import traceback
from typing import Callable, Optional

import torch

import nmcompile  # noqa: F401  (registers torch.ops.nm.*)
from nmcompile.kernels.gemm import cusparselt_version, int8_gemm

nm = torch.ops.nm
SHAPES = [(768, 8192), (1024, 16384), (2048, 16384), (2048, 32768), (4096, 16384), (4096, 32768)]
QUICK = [(768, 8192), (2048, 16384), (4096, 16384), (4096, 32768)]
SMOKE = [(64, 256)]
CPU_SHAPES = [(1024, 4096), (2048, 4096)]
CPU_QUICK = [(1024, 4096)]
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


def _onednn_u8s8(a, b):
    """oneDNN's int8 linear (Inductor's x86 quantization backend) on the same codes: A shifted to uint8 with
    zero point 128 (its compensation is exact in int32), B packed each call (in training it changes every
    step), fp32 output scaled inside the kernel. A probe of what a faster int8 GEMM than ``_int_mm`` could
    give, not an exact lowering: its scaling rounds in fp32."""
    ones, zeros = torch.ones(b.shape[1]), torch.zeros(b.shape[1], dtype=torch.long)
    packed = torch.ops.onednn.qlinear_prepack(b.t().contiguous(), list(a.shape))
    shifted = (a.to(torch.int16) + 128).to(torch.uint8)
    return torch.ops.onednn.qlinear_pointwise.default(shifted, 1.0, 128, packed, ones, zeros, None, 1.0, 0,
                                                      torch.float32, "none", [], "")


@functools.cache
def _onednn_exact() -> bool:
    """Whether this torch has oneDNN's int8 linear and it gives the integer product of codes ±127 (K = 512:
    sums below 2^24, so exact in its fp32 output)."""
    if not (hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qlinear_pointwise")):
        return False
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(-127, 128, shape, generator=g, dtype=torch.int8) for shape in ((64, 512), (512, 48)))
    try:
        return torch.equal(_onednn_u8s8(a, b), (a.long() @ b.long()).float())
    except RuntimeError:
        return False


def gemm_variants(role: str, d: int, tokens: int, device: torch.device, cpu: bool = False) -> dict:
    """name -> (function of the inputs, input maker) for one GEMM of the layer. ``cpu``: fp32 operands,
    the bf16 and fp32 GEMMs and the int8 ones (the CPU has no FP8 or sparse kernels that pay)."""
    ff = 4 * d
    bf16 = torch.float32 if cpu else torch.bfloat16  # the operands' (and outputs') dtype

    def grad_and_other():
        delta = torch.randn(tokens, ff, device=device, dtype=bf16)
        if role == "dgrad":
            return delta, torch.randn(ff, d, device=device, dtype=bf16)  # δ (T×ff) · W (ff×d)
        return delta.t(), torch.randn(tokens, d, device=device, dtype=bf16)  # δᵀ (ff×T) · X (T×d)

    def forward_operands():
        return torch.randn(tokens, d, device=device, dtype=bf16), torch.randn(ff, d, device=device, dtype=bf16).t()

    def codes(x, kind):
        return nm.sawb_fp8(x, 4) if kind == "sawb" else nm.luq_fp8(x, seeds(x.device), 4, "strict")

    def int8(x, kind):
        return nm.sawb_int8(x, 4) if kind == "sawb" else nm.luq_int8(x, seeds(x.device), 4, "strict")

    def in_bf16(make):
        return lambda: tuple(t.bfloat16() for t in make())

    def pruned(g):
        return nm.mvue(g, seeds(g.device)[0], 2, 4, 1)

    make = forward_operands if role == "fwd" else grad_and_other
    kinds = ("sawb", "sawb") if role == "fwd" else ("luq", "sawb")
    out = {"dense": (lambda a, b: torch.mm(a, b), in_bf16(make) if cpu else make)}
    if cpu:
        out["fp32"] = (lambda a, b: torch.mm(a, b), make)
    # as the training graphs run them: Inductor compiles int8_gemm, fusing its scaling into one pass
    out["int8"] = (torch.compile(lambda a, sa, b, sb: int8_gemm(a, sa, b, sb, None, bf16), fullgraph=True),
                   lambda: (lambda a, b: (*int8(a, kinds[0]), *int8(b, kinds[1])))(*make()))
    out["int8+quant"] = (torch.compile(lambda a, b: int8_gemm(*int8(a, kinds[0]), *int8(b, kinds[1]), None, bf16),
                                       fullgraph=True), make)
    if cpu and _onednn_exact():
        out["onednn u8s8"] = (_onednn_u8s8,
                              lambda: (lambda a, b: (int8(a, kinds[0])[0], int8(b, kinds[1])[0]))(*make()))
    if cpu:
        return out
    if role == "fwd":
        out["fp8"] = (lambda a, sa, b, sb: nm.fp8_mm(a, sa, b, sb, None, bf16),
                      lambda: (*codes(make()[0], "sawb"), *codes(make()[1], "sawb")))
        out["fp8+quant"] = (lambda a, b: nm.fp8_mm(*codes(a, "sawb"), *codes(b, "sawb"), None, bf16), make)
        return out

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


def kernel_variants(d: int, tokens: int, device: torch.device, cpu: bool = False) -> dict:
    """name -> (function of δ, bytes it must move) for the prune/quantize kernels (δ in bf16; fp32 with ``cpu``)."""
    ff = 4 * d
    n = tokens * ff
    size = 4 if cpu else 2  # bytes per element of δ
    out = {
        "copy": (lambda x: x.clone(), 2 * size * n),
        "mvue 2:4": (lambda x: nm.mvue(x, seeds(device)[0], 2, 4, 1), 2 * size * n),
        "luq4": (lambda x: nm.luq(x, seeds(device), 4, "strict"), 2 * size * n),
        "sawb4": (lambda x: nm.sawb(x, 4), 2 * size * n),
        "luq4 → int8": (lambda x: nm.luq_int8(x, seeds(device), 4, "strict"), (size + 1) * n),
        "sawb4 → int8": (lambda x: nm.sawb_int8(x, 4), (size + 1) * n),
        "absmax8 → int8": (lambda x: nm.absmax_int8(x, 8), (size + 1) * n),
        # the int8 preset's gradient quantizer: one uniform per element from the counter hash, in the kernel
        "sr8 → int8": (lambda x: nm.sr_int8(x, seeds(device), 8), (size + 1) * n),
        "sr8/row → int8": (lambda x: nm.sr_int8(x, seeds(device), 8, 1), (size + 1) * n),
    }
    if not cpu:
        out["luq4 → fp8"] = (lambda x: nm.luq_fp8(x, seeds(device), 4, "strict"), 3 * n)
        out["sawb4 → fp8"] = (lambda x: nm.sawb_fp8(x, 4), 3 * n)
    return out


def run(shapes: list, device: torch.device, save: Callable[[list], None], cpu: bool = False) -> list:
    """All rows; ``save(rows)`` after each shape, so a run cut short keeps what it measured."""
    time_ms = timer(device)
    rows = []
    for d, tokens in shapes:
        for role in ("fwd", "dgrad", "wgrad"):
            variants = gemm_variants(role, d, tokens, device, cpu)
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
        dtype = torch.float32 if cpu else torch.bfloat16
        delta_sets = [torch.randn(tokens, 4 * d, device=device, dtype=dtype) for _ in range(ROTATE)]
        for name, (fn, nbytes) in kernel_variants(d, tokens, device, cpu).items():
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
    gemm_names = [n for n in ("fp32", "int8", "int8+quant", "onednn u8s8", "fp8", "fp8+quant", "2:4", "2:4+prune",
                              "2:4 fp8", "2:4 fp8+prune+quant") if any(r["variant"] == n for r in rows)]
    cpu = any(r["variant"] == "fp32" for r in rows)
    extra = ["int8+quant vs fp32 ×"] if cpu else []
    out.append("| d | tokens | GEMM | M×N×K | dense bf16 ms | " + " | ".join([f"{n} ×" for n in gemm_names] + extra)
               + " |")
    out.append("|---|---|---|---|---|" + "---|" * (len(gemm_names) + len(extra)))
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
                target = _target(name, role, d, tokens, keyed.get((d, tokens, role, "fp32")) is not None)
                cells.append(f"{ratio:.2f}" + (f" ({'✓' if ratio >= target else '✗'} ≥{target})" if target else ""))
        fp32, int8q = keyed.get((d, tokens, role, "fp32"), {}), keyed.get((d, tokens, role, "int8+quant"), {})
        if "ms" in fp32 and "ms" in int8q:  # the CPU's other baseline
            ratio = fp32["ms"] / int8q["ms"]
            cells.append(f"{ratio:.2f} ({'✓' if ratio >= 4 else '✗'} ≥4)")
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


def _target(name: str, role: str, d: int, tokens: int, cpu: bool = False) -> Optional[float]:
    """The issue's targets (same-run ratios on an H100/H200; on CPU int8 against bf16 for M, N, K >= 1024,
    on an A100-class GPU 1.6)."""
    if name == "int8+quant":
        return 1.3 if cpu else 1.6
    if name == "fp8+quant" and d >= 2048:
        return 1.5
    if name == "2:4+prune" and role == "wgrad" and d >= 2048 and tokens >= 16384:
        return 1.15
    return None


def meta(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "device": str(device), "cusparselt": cusparselt_version()}
    if device.type == "cpu":
        from nmcompile.demo.environment import cpu_name

        flags = open("/proc/cpuinfo").read() if sys.platform == "linux" else ""
        info.update(cpu=cpu_name(), threads=torch.get_num_threads(),
                    isa=sorted({f for f in ("avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "avx512_bf16")
                                if f" {f}" in flags}))
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
    p.add_argument("--cpu", action="store_true", help="on the CPU: int8 against bf16 and fp32 (fp32 operands)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script, measures nothing")
    p.add_argument("--out", help="write rows and meta data as JSON here")
    args = p.parse_args(argv)
    if args.smoke:
        device, shapes = torch.device("cpu"), SMOKE
    elif args.cpu:
        device, shapes = torch.device("cpu"), CPU_QUICK if args.quick else CPU_SHAPES
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
        rows = run(shapes, device, save, cpu=args.cpu)
    except Exception:  # noqa: BLE001  (keep what was measured)
        traceback.print_exc()
    where = info.get("gpu") or f"{info.get('cpu')} ({', '.join(info.get('isa', []))}; {info.get('threads')} threads)"
    print(f"bench_gemm on {where}, torch {info['torch']}, cuSPARSELt {info['cusparselt']}\n")
    print(tables(rows))
    return 0 if rows and not all("error" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

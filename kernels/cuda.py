"""The nm ops' CUDA kernels, in Triton: one pass per group or element, no intermediate tensors.

On CUDA the portable torch math (``sparsity``/``luq``/``sawb``) runs as a dozen or more elementwise
kernels per op, each reading and writing the whole gradient. These kernels do the same arithmetic,
operation by operation (IEEE division, exponent-bit floor(log2), the same counter-based hash for the
uniforms, the same summation order), so they return the same bits as the torch math:

- ``prune``: MVUE and greedy for M = 2 and 4 (1:2, 1:4, 2:4, 3:4), one group per lane, over the
  ``[outer, k, inner]`` view of any dense layout (``grouping.group_plan``); other patterns keep the
  torch math.
- ``luq``: one pass for max|x| (``stats``), one elementwise pass writing the values, or float8 codes
  directly (``nm.luq_fp8``: no dtype round trip).
- ``sr``: uniform stochastic rounding (``sr.py``), as ``luq``: one pass for max|x|, one elementwise pass.
- ``sawb``: one pass for the moments (per-block partials, fp64 sums, reduced in a fixed order, so
  runs are reproducible), one elementwise pass writing values or e4m3 codes.

Float8 codes are written as their bit patterns (the values are exact by construction, ``fp8.py``),
which also keeps the kernels runnable by Triton's CPU interpreter: the tests run them there
(``TRITON_INTERPRET=1``) against the torch math. ``available()`` is False without Triton; the ops
then keep the torch math on CUDA.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, Optional

import torch

from .grouping import grouped_layout, prepare, sampled_layout
from .sawb import SAWB_COEFFICIENTS, round_significand, scale_bits
from .sr import sr_levels, sr_scale

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the ops keep their torch math
    triton = None

BLOCK = 1024
STATS_BLOCK = 4096
_FP8_KIND = {torch.float8_e4m3fn: 1, torch.float8_e5m2: 2}
_INT8_KIND = 3  # the int8 codes (int8.py): integers, written as int8


def available() -> bool:
    return triton is not None


_warned: set = set()


def or_reference(kernel: Callable[[], torch.Tensor], reference: Callable[[], torch.Tensor], what: str) -> torch.Tensor:
    """``kernel()``; if it raises (a GPU, library or Triton version it does not work with), warn once
    and return ``reference()``: the same result from the portable path, never a wrong or missing one."""
    try:
        return kernel()
    except Exception as err:  # noqa: BLE001
        if what not in _warned:
            _warned.add(what)
            warnings.warn(f"nmcompile: {what} failed here, using the portable path instead (slower): "
                          f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                          RuntimeWarning, stacklevel=2)
        return reference()


def prune_supported(m: int) -> bool:
    return m in (2, 4)


if triton is not None:
    _MASK32 = tl.constexpr(0xFFFFFFFF)

    @triton.jit
    def _fmix32(h):
        h = h ^ (h >> 16)
        h = (h * 0x85EBCA6B) & _MASK32
        h = h ^ (h >> 13)
        h = (h * 0xC2B2AE35) & _MASK32
        return h ^ (h >> 16)

    @triton.jit
    def _uniform(index, seed):
        """``kernels.random.uniform``: the uniform of element ``index`` (int64) for ``seed`` (int64)."""
        h = _fmix32((index ^ seed) & _MASK32)
        h = _fmix32((h + (seed >> 32)) & _MASK32)
        return (h >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2^-24

    @triton.jit
    def _sample_uniforms(u_index, s, seed_ptr, u_ptr, u_sample, mask, SEEDED: tl.constexpr):
        """The uniforms of sample ``s`` of a stochastic quantizer: hashed from seed s, or read from u."""
        if SEEDED:
            return _uniform(u_index, tl.load(seed_ptr + s))
        return tl.load(u_ptr + s * u_sample + u_index, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _sign(x):
        return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))

    @triton.jit
    def _finite(x):
        return tl.abs(x) < float("inf")

    @triton.jit
    def _to(v, ty: tl.constexpr):
        """fp32 -> ``ty``, rounding to nearest even (bf16 by hand: Triton's CPU interpreter truncates)."""
        if ty == tl.bfloat16:
            bits = v.to(tl.int32, bitcast=True)
            rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) & -65536).to(tl.float32, bitcast=True)
            v = tl.where(v != v, v, rounded)
        return v.to(ty)

    @triton.jit
    def _fp8_bits(v, KIND: tl.constexpr):
        """The float8 bit pattern (int32 in 0..255) of an fp32 ``v`` that the format holds exactly
        (KIND 1: e4m3fn, 2: e5m2); NaN and Inf give NaN."""
        bits = v.to(tl.int32, bitcast=True)
        sign = (bits >> 24) & 0x80
        exp = ((bits >> 23) & 0xFF) - 127
        if KIND == 1:
            mant = (bits >> 20) & 0x7
            normal = ((exp + 7) << 3) | mant
            sub = (mant | 8) >> tl.minimum(tl.maximum(-6 - exp, 0), 4)
            out = tl.where(exp >= -6, normal, sub)
            nan = 0x7F
        else:
            mant = (bits >> 21) & 0x3
            normal = ((exp + 15) << 2) | mant
            sub = (mant | 4) >> tl.minimum(tl.maximum(-14 - exp, 0), 3)
            out = tl.where(exp >= -14, normal, sub)
            nan = 0x7F
        out = tl.where((bits & 0x7FFFFFFF) == 0, 0, out)
        out = tl.where(exp == 128, nan, out)
        return out | sign

    @triton.jit
    def _mvue_step(xi, ai, ci, lo, free_n, safe_sum, share, full, uu, N: tl.constexpr, LAST: tl.constexpr):
        # sparsity.mvue_math, element i of its group
        p = tl.where(ci, 1.0, tl.minimum(tl.math.div_rn(ai * free_n, safe_sum), 1.0))
        if LAST:
            hi = tl.where(full, N * 1.0, lo + p)
        else:
            hi = tl.minimum(lo + p, N * 1.0)
        base = tl.floor(lo)
        lo_frac = lo - base
        hi_frac = hi - base
        keep = ((uu >= lo_frac) & (uu < hi_frac)) | (uu < hi_frac - 1.0)
        value = tl.where(ci, xi, _sign(xi) * share)
        return tl.where(keep, value, 0.0), hi

    @triton.jit
    def _ahead(aj, ai, j: tl.constexpr, i: tl.constexpr):
        # does element j rank before element i: larger, or equal and earlier (sparsity.greedy_math)
        if j < i:
            return tl.where(aj >= ai, 1.0, 0.0)
        else:
            return tl.where(aj > ai, 1.0, 0.0)

    @triton.jit
    def _greedy_keep(ai, i: tl.constexpr, a0, a1, a2, a3, N: tl.constexpr, M: tl.constexpr):
        ahead = tl.zeros_like(ai)
        if i != 0:
            ahead += _ahead(a0, ai, 0, i)
        if i != 1:
            ahead += _ahead(a1, ai, 1, i)
        if M == 4:
            if i != 2:
                ahead += _ahead(a2, ai, 2, i)
            if i != 3:
                ahead += _ahead(a3, ai, 3, i)
        return ahead < N

    @triton.jit
    def _prune_kernel(x_ptr, out_ptr, u_ptr, seed_ptr, u_outer_ptr, u_group, u_inner, K, INNER, PAIRS, TOTAL,
                      N: tl.constexpr, M: tl.constexpr, MVUE: tl.constexpr, SEEDED: tl.constexpr,
                      BLOCK: tl.constexpr):
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < TOTAL
        o = idx // PAIRS
        r = idx % PAIRS
        g = r // INNER
        i = r % INNER
        base = o * K * INNER + g * M * INNER + i
        x0 = tl.load(x_ptr + base, mask=mask, other=0.0).to(tl.float32)
        x1 = tl.load(x_ptr + base + INNER, mask=mask, other=0.0).to(tl.float32)
        if M == 4:
            x2 = tl.load(x_ptr + base + 2 * INNER, mask=mask, other=0.0).to(tl.float32)
            x3 = tl.load(x_ptr + base + 3 * INNER, mask=mask, other=0.0).to(tl.float32)
        else:
            x2 = tl.zeros_like(x0)
            x3 = tl.zeros_like(x0)
        a0, a1, a2, a3 = tl.abs(x0), tl.abs(x1), tl.abs(x2), tl.abs(x3)
        finite = _finite(x0) & _finite(x1)
        if M == 4:
            finite = finite & _finite(x2) & _finite(x3)
        if MVUE:
            c0 = a0 < 0.0  # all False
            c1, c2, c3 = c0, c0, c0
            for _ in tl.static_range(N - 1):
                if M == 4:
                    free_sum = tl.where(c0, 0.0, a0) + tl.where(c1, 0.0, a1)  # summed in order, as sparsity.py
                    free_sum = (free_sum + tl.where(c2, 0.0, a2)) + tl.where(c3, 0.0, a3)
                    free_n = N - (((c0.to(tl.float32) + c1.to(tl.float32)) + c2.to(tl.float32)) + c3.to(tl.float32))
                else:
                    free_sum = tl.where(c0, 0.0, a0) + tl.where(c1, 0.0, a1)
                    free_n = N - (c0.to(tl.float32) + c1.to(tl.float32))
                c0 = c0 | (a0 * free_n > free_sum)
                c1 = c1 | (a1 * free_n > free_sum)
                c2 = c2 | (a2 * free_n > free_sum)
                c3 = c3 | (a3 * free_n > free_sum)
            if M == 4:
                free_sum = ((tl.where(c0, 0.0, a0) + tl.where(c1, 0.0, a1)) + tl.where(c2, 0.0, a2)) + tl.where(
                    c3, 0.0, a3
                )
                free_n = N - (((c0.to(tl.float32) + c1.to(tl.float32)) + c2.to(tl.float32)) + c3.to(tl.float32))
                nonzero = (((a0 > 0).to(tl.float32) + (a1 > 0).to(tl.float32)) + (a2 > 0).to(tl.float32)) + (a3 > 0).to(
                    tl.float32
                )
            else:
                free_sum = tl.where(c0, 0.0, a0) + tl.where(c1, 0.0, a1)
                free_n = N - (c0.to(tl.float32) + c1.to(tl.float32))
                nonzero = (a0 > 0).to(tl.float32) + (a1 > 0).to(tl.float32)
            safe_sum = tl.where(free_sum > 0, free_sum, 1.0)
            share = tl.math.div_rn(free_sum, free_n)
            full = nonzero >= N
            u_index = tl.load(u_outer_ptr + o, mask=mask, other=0) + g * u_group + i * u_inner
            if SEEDED:
                uu = _uniform(u_index, tl.load(seed_ptr))
            else:
                uu = tl.load(u_ptr + u_index, mask=mask, other=0.0).to(tl.float32)
            lo = tl.zeros_like(x0)
            y0, lo = _mvue_step(x0, a0, c0, lo, free_n, safe_sum, share, full, uu, N, False)
            if M == 4:
                y1, lo = _mvue_step(x1, a1, c1, lo, free_n, safe_sum, share, full, uu, N, False)
                y2, lo = _mvue_step(x2, a2, c2, lo, free_n, safe_sum, share, full, uu, N, False)
                y3, lo = _mvue_step(x3, a3, c3, lo, free_n, safe_sum, share, full, uu, N, True)
            else:
                y1, lo = _mvue_step(x1, a1, c1, lo, free_n, safe_sum, share, full, uu, N, True)
                y2, y3 = x2, x3
        else:
            y0 = tl.where(_greedy_keep(a0, 0, a0, a1, a2, a3, N, M) | ~finite, x0, 0.0)
            y1 = tl.where(_greedy_keep(a1, 1, a0, a1, a2, a3, N, M) | ~finite, x1, 0.0)
            if M == 4:
                y2 = tl.where(_greedy_keep(a2, 2, a0, a1, a2, a3, N, M) | ~finite, x2, 0.0)
                y3 = tl.where(_greedy_keep(a3, 3, a0, a1, a2, a3, N, M) | ~finite, x3, 0.0)
            else:
                y2, y3 = x2, x3
        ty = out_ptr.dtype.element_ty
        tl.store(out_ptr + base, _to(tl.where(finite, y0, x0), ty), mask=mask)
        tl.store(out_ptr + base + INNER, _to(tl.where(finite, y1, x1), ty), mask=mask)
        if M == 4:
            tl.store(out_ptr + base + 2 * INNER, _to(tl.where(finite, y2, x2), ty), mask=mask)
            tl.store(out_ptr + base + 3 * INNER, _to(tl.where(finite, y3, x3), ty), mask=mask)

    @triton.jit
    def _stats_kernel(x_ptr, part_ptr, TOTAL, BLOCK: tl.constexpr):
        """Per block: max|x|, min x, Σx² and Σ|x| (fp64); NaN anywhere makes max|x| NaN."""
        pid = tl.program_id(0)
        idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < TOTAL
        x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        a = tl.abs(x)
        nan = tl.sum(tl.where(mask & (x != x), 1.0, 0.0), axis=0)
        amax = tl.max(tl.where(mask, a, 0.0), axis=0)
        amax = tl.where(nan > 0, float("nan"), amax)
        amin = tl.min(tl.where(mask, x, float("inf")), axis=0)
        xd = x.to(tl.float64)
        tl.store(part_ptr + pid * 4 + 0, amax.to(tl.float64))
        tl.store(part_ptr + pid * 4 + 1, amin.to(tl.float64))
        tl.store(part_ptr + pid * 4 + 2, tl.sum(tl.where(mask, xd * xd, 0.0), axis=0))
        tl.store(part_ptr + pid * 4 + 3, tl.sum(tl.where(mask, tl.abs(xd), 0.0), axis=0))

    @triton.jit
    def _luq_kernel(
        x_ptr,
        out_ptr,
        amax_ptr,
        seed_ptr,
        u_ptr,
        u_outer_ptr,
        u_inner,
        u_sample,
        INNER,
        TOTAL,
        SAMPLES: tl.constexpr,
        TOP: tl.constexpr,
        SEEDED: tl.constexpr,
        KIND: tl.constexpr,
        LARGEST: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < TOTAL
        x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        amax = tl.load(amax_ptr)
        # luq.luq_math, operation by operation
        r = tl.math.div_rn(tl.abs(x), amax) * (2.0**TOP)
        k = tl.minimum(tl.maximum(((r.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, 0), TOP)
        low = ((k + 127) << 23).to(tl.float32, bitcast=True)  # 2^k, exactly
        under = r < 1.0
        base = tl.where(under, 0.0, low)
        width = tl.where(under, 1.0, low)
        p_up = tl.math.div_rn(r - base, width)
        u_index = tl.load(u_outer_ptr + idx // INNER, mask=mask, other=0) + (idx % INNER) * u_inner
        ups = tl.zeros_like(x)
        for s in tl.static_range(SAMPLES):
            u = _sample_uniforms(u_index, s, seed_ptr, u_ptr, u_sample, mask, SEEDED)
            ups += tl.where(u < p_up, 1.0, 0.0)
        units = base + width * tl.math.div_rn(ups, SAMPLES * 1.0)
        if KIND == 0:
            q = (_sign(x) * (units * (2.0**-TOP))) * amax
            q = tl.where(amax > 0, q, x)
            q = tl.where(_finite(amax), q, x + amax)
            tl.store(out_ptr + idx, _to(q, out_ptr.dtype.element_ty), mask=mask)
        elif KIND == 3:  # int8 codes sign·units (one sample: 0, 1, 2^k), scale amax·2^-TOP; 0 for amax 0 or non-finite
            code = tl.where((amax > 0) & _finite(amax), _sign(x) * units, 0.0)
            tl.store(out_ptr + idx, code.to(tl.int8), mask=mask)
        else:  # float8 codes of the same values (fp8.luq_codes): sign·units·2^(LARGEST-TOP)
            code = _sign(x) * (units * (2.0 ** (LARGEST - TOP)))
            code = tl.where(amax == 0, 0.0, code)
            code = tl.where(_finite(amax), code, float("nan"))
            tl.store(out_ptr + idx, _fp8_bits(code, KIND).to(tl.uint8), mask=mask)

    @triton.jit
    def _sr_kernel(
        x_ptr,
        out_ptr,
        amax_ptr,
        scale_ptr,
        seed_ptr,
        u_ptr,
        u_outer_ptr,
        u_inner,
        u_sample,
        INNER,
        TOTAL,
        BIG,
        SAMPLES: tl.constexpr,
        LEVELS: tl.constexpr,
        SEEDED: tl.constexpr,
        CODES: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < TOTAL
        x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        amax = tl.load(amax_ptr)
        scale = tl.load(scale_ptr)
        # sr.sr_math, operation by operation
        safe = tl.where(scale > 0, scale, 1.0)
        v = tl.minimum(tl.math.div_rn(tl.abs(x), safe), LEVELS * 1.0)  # a guard: v <= L already
        lo = tl.floor(v)
        frac = v - lo
        u_index = tl.load(u_outer_ptr + idx // INNER, mask=mask, other=0) + (idx % INNER) * u_inner
        codes = tl.zeros_like(x)
        for s in tl.static_range(SAMPLES):
            u = _sample_uniforms(u_index, s, seed_ptr, u_ptr, u_sample, mask, SEEDED)
            codes += lo + tl.where(u < frac, 1.0, 0.0)  # 0 + c == c: the same sum as sr_math
        if CODES:  # int8 codes (one sample), 0 where amax is 0 or not finite
            code = tl.where((amax > 0) & _finite(amax), _sign(x) * codes, 0.0)
            tl.store(out_ptr + idx, code.to(tl.int8), mask=mask)
        else:
            q = _sign(x) * (tl.math.div_rn(codes, SAMPLES * 1.0) * scale)
            q = tl.minimum(tl.maximum(q, -BIG), BIG)  # saturate at x's dtype range
            q = tl.where(amax > 0, q, x)
            q = tl.where(_finite(amax), q, x + amax)
            tl.store(out_ptr + idx, _to(q, out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _sawb_kernel(x_ptr, out_ptr, params_ptr, TOTAL, CODES: tl.constexpr, BLOCK: tl.constexpr):
        """params: [scale, the dtype's largest finite value, lowest level, highest level] (fp32)."""
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < TOTAL
        x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(params_ptr)
        lowest = tl.load(params_ptr + 2)
        highest = tl.load(params_ptr + 3)
        positive = scale > 0
        safe = tl.where(positive, scale, 1.0)
        v = tl.math.div_rn(x, safe)
        level = tl.floor(v + 0.5)
        odd = (level - 2.0 * tl.floor(level * 0.5)) != 0.0
        level = tl.where(((level - v) == 0.5) & odd, level - 1.0, level)  # half to even, like torch.round
        signed_zero = (v.to(tl.int32, bitcast=True) & -2147483648).to(tl.float32, bitcast=True)
        level = tl.where(level == 0.0, signed_zero, level)  # and its sign of zero
        level = tl.minimum(tl.maximum(level, lowest), highest)
        if CODES == 1:  # fp8.sawb_codes: the integer level, 0 for an all-zero tensor, NaN when not finite
            code = tl.where(positive, level, 0.0)
            code = tl.where(_finite(scale), code, float("nan"))
            tl.store(out_ptr + idx, _fp8_bits(code, 1).to(tl.uint8), mask=mask)
        elif CODES == 2:  # int8 codes: the integer level, 0 for an all-zero or non-finite tensor
            code = tl.where(positive & _finite(scale), level, 0.0)
            tl.store(out_ptr + idx, code.to(tl.int8), mask=mask)
        else:
            ty = out_ptr.dtype.element_ty
            top = tl.load(params_ptr + 1)
            q = tl.minimum(tl.maximum(level * safe, -top), top)
            q = tl.where(positive, q, x)
            q = tl.where(_finite(scale), q, x + scale)
            tl.store(out_ptr + idx, _to(q, ty), mask=mask)


def _grid(total: int, block: int) -> tuple:
    return (max(1, math.ceil(total / block)),)


@functools.lru_cache(maxsize=256)
def _on_device(offsets: torch.Tensor, device: torch.device) -> torch.Tensor:
    return offsets.to(device)


def prune(x: torch.Tensor, u: Optional[torch.Tensor], n: int, m: int, dim: int, mvue: bool) -> torch.Tensor:
    """``nm.mvue`` (``u``: uniforms or an int64 seed) or ``nm.greedy`` (``u`` None) for M in (2, 4)."""
    src, out = prepare(x)
    if x.numel() == 0:
        return out
    plan, seeded = grouped_layout(src, u, m, dim)
    if plan is None:  # inner dims that do not nest: compute contiguously, copy back
        return out.copy_(prune(x.contiguous(), u.contiguous() if u is not None and not seeded else u, n, m, dim, mvue))
    outer, k, inner, u_outer, u_group, u_inner = plan
    groups = k // m
    pairs = groups * inner
    if pairs:
        dummy = torch.zeros(1, device=x.device)
        _prune_kernel[_grid(outer * pairs, BLOCK)](
            src,
            out,
            u if (u is not None and not seeded) else dummy,
            u if seeded else dummy.long(),
            _on_device(u_outer, x.device),
            u_group,
            u_inner,
            k,
            inner,
            pairs,
            outer * pairs,
            N=n,
            M=m,
            MVUE=mvue,
            SEEDED=seeded,
            BLOCK=BLOCK,
        )
    if k % m:  # the remainder along dim stays as it is
        full = groups * m
        view = (outer, k, inner)
        strides = (k * inner, inner, 1)
        out.as_strided(view, strides)[:, full:].copy_(src.as_strided(view, strides)[:, full:])
    return out


def _stats(src: torch.Tensor) -> torch.Tensor:
    """[max|x|, min x, Σx², Σ|x|] (fp64) of a dense tensor, over its memory in order."""
    total = src.numel()
    blocks = _grid(total, STATS_BLOCK)[0]
    parts = torch.empty((blocks, 4), dtype=torch.float64, device=src.device)
    _stats_kernel[(blocks,)](src, parts, total, BLOCK=STATS_BLOCK)
    # amax: NaN anywhere is NaN (torch.amax semantics); sums in a fixed order: reproducible
    amax = torch.where(parts[:, 0].isnan().any(), float("nan"), parts[:, 0].max())
    return torch.stack([amax, parts[:, 1].min(), parts[:, 2].sum(), parts[:, 3].sum()])


def _launch_stochastic(kernel, src: torch.Tensor, out: torch.Tensor, u: torch.Tensor, head: tuple, tail: tuple,
                       **meta) -> None:
    """Launch an elementwise stochastic quantizer's kernel over ``src`` in memory order, its arguments
    (src, out, *head, seeds, uniforms, u_outer, u_inner, u_sample, INNER, TOTAL, *tail); ``u``: uniforms
    ``(samples, *x.shape)`` or int64 seeds ``(samples,)``."""
    _, inner, u_outer, u_inner, u_sample, samples, seeded, *_ = sampled_layout(src, u)
    dummy = torch.zeros(1, device=src.device)
    kernel[_grid(src.numel(), BLOCK)](
        src, out, *head, u.contiguous() if seeded else dummy.long(), dummy if seeded else u,
        _on_device(u_outer, src.device), u_inner, u_sample, inner, src.numel(), *tail,
        SAMPLES=samples, SEEDED=seeded, BLOCK=BLOCK, **meta,
    )


def luq(x: torch.Tensor, u: torch.Tensor, top: int, codes: Optional[torch.dtype] = None):
    """``nm.luq`` (``u``: uniforms ``(samples, *x.shape)`` or int64 seeds ``(samples,)``); with
    ``codes`` (a float8 dtype or int8, one sample) ``nm.luq_fp8``'s / ``nm.luq_int8``'s (codes, scale)."""
    src, out = prepare(x)
    if codes is not None:
        out = torch.empty_like(src, dtype=torch.int8 if codes == torch.int8 else torch.uint8)
    if x.numel() == 0:
        return out if codes is None else (out.view(codes), torch.ones((), device=x.device))
    amax = _stats(src)[0].float()
    if codes == torch.int8:
        _launch_stochastic(_luq_kernel, src, out, u, (amax,), (), TOP=top, KIND=_INT8_KIND, LARGEST=0)
        return out, torch.where(amax == 0, 1.0, amax * 2.0**-top)
    largest = {None: 0, torch.float8_e4m3fn: 8, torch.float8_e5m2: 15}[codes]
    _launch_stochastic(_luq_kernel, src, out, u, (amax,), (), TOP=top, KIND=_FP8_KIND.get(codes, 0), LARGEST=largest)
    if codes is None:
        return out
    scale = torch.where(amax == 0, 1.0, amax * 2.0**-largest)
    return out.view(codes), scale


def sawb(x: torch.Tensor, bits: int, codes: Optional[torch.dtype] = None):
    """(``nm.sawb``'s values, or its codes with ``codes``: e4m3 or int8) and the fp32 scale."""
    src, out = prepare(x)
    if codes is not None:
        out = torch.empty_like(src, dtype=torch.int8 if codes == torch.int8 else torch.uint8)
    n = x.numel()
    if n == 0:
        return (out if codes is None else out.view(codes)), torch.ones((), device=x.device)
    c1, c2 = SAWB_COEFFICIENTS[bits]
    half = 2.0 ** (bits - 1)
    amax, amin, sum_sq, sum_abs = _stats(src)
    clip = c1 * torch.sqrt(sum_sq / n) - c2 * (sum_abs / n)
    clip = torch.where(clip > 0, clip, amax)
    unsigned = amin >= 0
    scale = torch.where(unsigned, clip / (2 * half - 1), clip / half).float()
    scale = round_significand(scale, scale_bits(x.dtype, bits))
    scale = torch.where(torch.isfinite(amax), scale, amax.float())  # NaN/Inf: propagated
    lowest = torch.where(unsigned, 0.0, -half)
    highest = torch.where(unsigned, 2 * half - 1, half - 1)
    top = torch.tensor(torch.finfo(x.dtype).max, device=x.device, dtype=torch.float32)
    params = torch.stack([scale, top, lowest.float(), highest.float()])  # on the device: no sync
    _sawb_kernel[_grid(n, BLOCK)](src, out, params, n, CODES={None: 0, torch.int8: 2}.get(codes, 1), BLOCK=BLOCK)
    if codes is not None:
        return out.view(codes), torch.where(scale == 0, 1.0, scale)
    return out, scale


def sr(x: torch.Tensor, u: torch.Tensor, bits: int, codes: Optional[torch.dtype] = None):
    """``nm.sr`` (``u``: uniforms ``(samples, *x.shape)`` or int64 seeds ``(samples,)``); with ``codes``
    (torch.int8, one sample) ``nm.sr_int8``'s (codes, scale)."""
    assert codes in (None, torch.int8), codes
    src, out = prepare(x)
    if codes is not None:
        out = torch.empty_like(src, dtype=torch.int8)
    if x.numel() == 0:
        return (out, torch.ones((), device=x.device)) if codes is not None else out
    amax = _stats(src)[0].float()
    scale = sr_scale(amax, x.dtype, bits)  # on the device: no sync
    _launch_stochastic(_sr_kernel, src, out, u, (amax, scale), (torch.finfo(x.dtype).max,), LEVELS=sr_levels(bits),
                       CODES=codes is not None)
    if codes is not None:
        return out, torch.where(amax == 0, 1.0, torch.where(torch.isfinite(amax), scale, amax))
    return out

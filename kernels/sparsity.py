"""N:M pruning math: MVUE (unbiased, minimum variance) and greedy (keep the N largest, biased).

Both are written with elementwise ops over groups of M only (no sort, no scan, no data-dependent
control flow). They are the portable implementation of ``torch.ops.nm.mvue``/``greedy`` (devices
without kernels of their own) and the specification the CPU kernels in ``nm_cpu.cpp`` follow
operation by operation, bit for bit. All math is fp32; the input dtype is returned.
Groups holding a NaN or Inf are returned unchanged so non-finite gradients stay visible.
"""
from __future__ import annotations

import torch

from .grouping import UnrolledGroups


def _total(terms: list):
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


def mvue_math(x: torch.Tensor, u: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """MVUE N:M along ``dim`` with one uniform ``u`` in [0, 1) per group (shape: ``uniform_shape``).

    Inclusion probabilities by water-filling: p = min(1, c·|x|) with Σp = N (capping the elements
    with c·|x| > 1 only raises c, so capped elements stay capped and N-1 rounds reach the fixed
    point). Systematic sampling: element i is kept iff some u + k (k integer) falls in
    [C_{i-1}, C_i), C the prefix sums of p; each interval is at most 1 long, so exactly N distinct
    elements are kept with marginals p. Kept values become x/p: x itself where capped, else
    sign(x)·S_free/N_free.

    The group is unrolled into its M elements (strided slices, in memory order), so every group
    quantity is a sum of M terms, as in the CPU kernel. The result has x's memory layout.
    """
    groups = UnrolledGroups(x, m, dim)
    xs = [t.float() for t in groups.slices]
    a = [t.abs() for t in xs]
    capped = [torch.zeros_like(a[0], dtype=torch.bool)] * m
    for _ in range(n - 1):
        free_sum = _total([torch.where(c, 0.0, ai) for ai, c in zip(a, capped)])
        free_n = n - _total([c.float() for c in capped])
        capped = [c | (ai * free_n > free_sum) for ai, c in zip(a, capped)]
    free_sum = _total([torch.where(c, 0.0, ai) for ai, c in zip(a, capped)])
    free_n = n - _total([c.float() for c in capped])
    safe_sum = torch.where(free_sum > 0, free_sum, 1.0)
    share = free_sum / free_n
    # A group with >= N nonzeros has Σp = N: pin the last bound to N, so fp32 rounding of the sum
    # cannot lose the point u + N - 1 (the bounds still telescope: each lower bound is the previous
    # upper bound, the same tensor).
    full = _total([(ai > 0).float() for ai in a]) >= n
    uu = groups.per_group(u).float()
    lo = torch.zeros_like(uu)
    outs = []
    for i in range(m):
        # (a·N_free)/S_free, not a·(N_free/S_free): a lone free element must get p = 1 exactly
        p = torch.where(capped[i], 1.0, (a[i] * free_n / safe_sum).clamp(max=1.0))
        hi = torch.where(full, float(n), lo + p) if i == m - 1 else (lo + p).clamp(max=float(n))
        # x - floor(lo) is exact in floating point (hi - u is not: it can round across an integer
        # when u is near 1), so the keep test below is exact.
        base = torch.floor(lo)
        lo_frac, hi_frac = lo - base, hi - base
        keep = ((uu >= lo_frac) & (uu < hi_frac)) | (uu < hi_frac - 1.0)
        value = torch.where(capped[i], xs[i], torch.sign(xs[i]) * share)
        outs.append(torch.where(keep, value, 0.0))
        lo = hi
    finite = _total([torch.isfinite(t).float() for t in xs]) == m
    outs = [torch.where(finite, o, t) for o, t in zip(outs, xs)]  # groups holding NaN/Inf pass through
    return groups.assemble(outs, x.dtype)


def greedy_math(x: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """Keep the N largest |x| of every group of M unchanged (ties: lower index first)."""
    groups = UnrolledGroups(x, m, dim)
    xs = groups.slices
    a = [t.float().abs() for t in xs]
    finite = _total([torch.isfinite(t).float() for t in a]) == m
    outs = []
    for i in range(m):
        # rank of element i: elements larger than it, and equal ones that come before it
        ahead = _total([((a[j] >= a[i]) if j < i else (a[j] > a[i])).float() for j in range(m) if j != i])
        keep = (ahead < n) | ~finite  # groups holding NaN/Inf pass through
        outs.append(torch.where(keep, xs[i], torch.zeros_like(xs[i])))
    return groups.assemble(outs, x.dtype)

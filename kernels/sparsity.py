"""N:M pruning math: MVUE (unbiased, minimum variance) and greedy (keep the N largest, biased).

Both are written with elementwise ops and reductions over groups of M only (no sort, no scan, no
data-dependent control flow), so the same functions serve as the eager kernel and as the Inductor
decomposition that fuses with neighbouring kernels. All math is fp32; the input dtype is returned.
Groups holding a NaN or Inf are returned unchanged so non-finite gradients stay visible.
"""
from __future__ import annotations

import torch

from .grouping import merge_groups, split_groups


def _prefix_sums(p: torch.Tensor, inclusive: bool) -> torch.Tensor:
    # Sum over a (strictly) lower-triangular mask instead of cumsum: fusable everywhere, and the
    # exclusive sum of element i is bit-identical to the inclusive sum of element i-1 (same terms
    # in the same positions), which makes the systematic-sampling counts telescope exactly.
    m = p.shape[-1]
    mask = torch.ones(m, m, dtype=torch.bool, device=p.device).tril(0 if inclusive else -1)
    return torch.where(mask, p.unsqueeze(-2), 0.0).sum(-1)


def mvue_probabilities(a: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Water-filling inclusion probabilities for magnitudes ``a`` of shape ``[..., M]``.

    Returns ``(p, capped, share)``: p = min(1, c·a) with Σp = N (or the count of nonzeros when
    there are fewer), the capped mask (p = 1), and share = 1/c, the value a kept uncapped element
    takes in magnitude (S_free / N_free).
    """
    capped = torch.zeros_like(a, dtype=torch.bool)
    # Capping the elements with c·a > 1 only raises c, so capped elements stay capped; the fixed
    # point holds at most N-1 capped elements, hence N-1 rounds suffice.
    for _ in range(n - 1):
        free_sum = torch.where(capped, 0.0, a).sum(-1, keepdim=True)
        free_n = n - capped.sum(-1, keepdim=True)
        capped = capped | (a * free_n > free_sum)
    free_sum = torch.where(capped, 0.0, a).sum(-1, keepdim=True)
    free_n = (n - capped.sum(-1, keepdim=True)).to(a.dtype)
    safe_sum = torch.where(free_sum > 0, free_sum, 1.0)
    p = torch.where(capped, 1.0, torch.where(free_sum > 0, a * free_n / safe_sum, 0.0))
    return p, capped, free_sum / free_n


def mvue_math(x: torch.Tensor, u: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """MVUE N:M along ``dim`` with one uniform ``u`` in [0, 1) per group (shape: ``uniform_shape``).

    Systematic sampling: element i is kept iff some u + k (k integer) falls in [C_{i-1}, C_i),
    C the prefix sums of p (all comparisons exact in fp32). Each interval is at most 1 long, so exactly N distinct elements are
    kept with marginals p. Kept values become x/p (capped ones stay x).
    """
    body, tail = split_groups(x, m, dim)
    xf = body.float()
    a = xf.abs()
    p, capped, share = mvue_probabilities(a, n)
    hi = _prefix_sums(p, inclusive=True).clamp(0.0, n)
    lo = _prefix_sums(p, inclusive=False).clamp(0.0, n)
    # A group with >= N nonzeros has Σp = N; pin it, so fp32 rounding of the sum cannot lose the
    # last point u + N - 1 (only the last upper bound changes: the bounds still telescope).
    full = (a > 0).sum(-1, keepdim=True) >= n
    last = torch.arange(m, device=x.device) == m - 1
    hi = torch.where(full & last, float(n), hi)
    # Keep iff u + k lies in [lo, hi) for an integer k. Written with x - floor(lo), which is exact in
    # floating point, instead of hi - u, which can round across an integer when u is near 1.
    base = torch.floor(lo)
    lo_frac, hi_frac = lo - base, hi - base  # lo_frac in [0, 1), hi_frac in [lo_frac, lo_frac + 1]
    uu = u.float().unsqueeze(-1)
    keep = ((uu >= lo_frac) & (uu < hi_frac)) | (uu < hi_frac - 1.0)
    value = torch.where(capped, xf, torch.sign(xf) * share)
    out = torch.where(keep, value, 0.0)
    finite = torch.isfinite(xf).all(-1, keepdim=True)
    out = torch.where(finite, out, xf)
    return merge_groups(out.to(x.dtype), tail, dim)


def greedy_math(x: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """Keep the N largest |x| of every group of M unchanged (ties: lower index first)."""
    body, tail = split_groups(x, m, dim)
    a = body.float().abs()
    ai, aj = a.unsqueeze(-1), a.unsqueeze(-2)  # [..., i, j]
    earlier = torch.ones(m, m, dtype=torch.bool, device=x.device).tril(-1)  # j < i
    rank = ((aj > ai) | ((aj == ai) & earlier)).sum(-1)
    out = torch.where(rank < n, body, torch.zeros_like(body))
    finite = torch.isfinite(body).all(-1, keepdim=True)
    out = torch.where(finite, out, body)
    return merge_groups(out, tail, dim)

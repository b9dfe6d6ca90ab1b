"""Straightforward reference implementations, written independently of the fused kernels.

They sort each group and follow the textbook description (docs/architecture.md, "Algorithms"), so they can check the
kernels' results, and they expose the exact inclusion probabilities and variances the
statistical tests compare against.
"""
from __future__ import annotations

import math

import torch

from .grouping import merge_groups, split_groups
from .luq import luq_levels


def mvue_inclusion_probabilities(groups: torch.Tensor, n: int) -> torch.Tensor:
    """Exact MVUE marginals p for ``groups`` of shape [..., M] (float64), via sorting.

    With a sorted descending, r capped elements is the smallest r with (N-r)·a_(r+1) ≤ Σ_{j>r} a_j;
    then p = 1 for the r largest and p = (N-r)·a / Σ_{j>r} a_j for the rest.
    """
    a = groups.double().abs()
    s, order = a.sort(-1, descending=True)
    m = a.shape[-1]
    suffix = s.flip(-1).cumsum(-1).flip(-1)  # suffix[j] = Σ_{i>=j} s_i
    ranks = torch.arange(n, dtype=torch.float64)
    fits = (n - ranks) * s[..., :n] <= suffix[..., :n]  # [..., n]; r = n-1 always fits
    r = fits.to(torch.int64).argmax(-1, keepdim=True)  # first r that fits
    pos = torch.arange(m).expand_as(s)
    free_sum = suffix.gather(-1, r)
    scale = torch.where(free_sum > 0, (n - r).double() / torch.where(free_sum > 0, free_sum, 1.0), 0.0)
    p_sorted = torch.where(pos < r, 1.0, torch.clamp(scale * s, max=1.0))
    return torch.empty_like(p_sorted).scatter_(-1, order, p_sorted)


def mvue_variance(groups: torch.Tensor, n: int) -> torch.Tensor:
    """Per-element variance x²(1/p - 1) of the MVUE estimator (0 where p is 0 or 1)."""
    x = groups.double()
    p = mvue_inclusion_probabilities(x, n)
    return torch.where(p > 0, x * x * (1 / p.clamp_min(1e-300) - 1), torch.zeros_like(x))


def mvue_reference(x: torch.Tensor, u: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """MVUE via sorted water-filling and cumsum-based systematic sampling (float64)."""
    body, tail = split_groups(x, m, dim)
    p = mvue_inclusion_probabilities(body, n)
    cum = p.cumsum(-1).clamp(max=n)
    prev = torch.cat([torch.zeros_like(cum[..., :1]), cum[..., :-1]], -1)
    uu = u.double().unsqueeze(-1)
    keep = torch.ceil(cum - uu) > torch.ceil(prev - uu)
    xd = body.double()
    out = torch.where(keep & (p > 0), xd / p.clamp_min(1e-300), torch.zeros_like(xd))
    finite = torch.isfinite(xd).all(-1, keepdim=True)
    out = torch.where(finite, out, xd)
    return merge_groups(out.to(x.dtype), tail, dim)


def greedy_reference(x: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    body, tail = split_groups(x, m, dim)
    idx = body.abs().float().topk(n, dim=-1, sorted=False).indices
    mask = torch.zeros_like(body, dtype=torch.bool).scatter_(-1, idx, True)
    return merge_groups(torch.where(mask, body, torch.zeros_like(body)), tail, dim)


def luq_grid(x: torch.Tensor, bits: int, levels: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper) neighbouring LUQ levels in magnitude for every element, and α is implied."""
    L = luq_levels(bits, levels)
    a = x.double().abs()
    alpha = a.max() / 2.0 ** (L - 1)
    grid = torch.cat([torch.zeros(1, dtype=torch.float64), alpha * 2.0 ** torch.arange(L, dtype=torch.float64)])
    hi_idx = torch.searchsorted(grid, a, right=False).clamp(max=L)
    lo_idx = torch.where(grid[hi_idx] == a, hi_idx, hi_idx - 1)
    return grid[lo_idx], grid[hi_idx]


def luq_reference(x: torch.Tensor, u: torch.Tensor, bits: int, levels: str) -> torch.Tensor:
    """LUQ by explicit search of the two neighbouring levels (float64)."""
    a = x.double().abs()
    if a.max() == 0:
        return x.clone()
    lo, hi = luq_grid(x, bits, levels)
    width = hi - lo
    p_up = torch.where(width > 0, (a - lo) / torch.where(width > 0, width, 1.0), torch.zeros_like(a))
    q = torch.where(u.double() < p_up, hi, lo).mean(0)
    return (torch.sign(x.double()) * q).to(x.dtype)


def luq_variance(x: torch.Tensor, bits: int, levels: str, samples: int = 1) -> torch.Tensor:
    """Exact per-element variance (hi - |x|)(|x| - lo) / samples."""
    lo, hi = luq_grid(x, bits, levels)
    a = x.double().abs()
    return (hi - a) * (a - lo) / samples


def sawb_reference(x: torch.Tensor, bits: int, c1: float, c2: float) -> torch.Tensor:
    xd = x.double()
    clip = c1 * xd.pow(2).mean().sqrt() - c2 * xd.abs().mean()
    if clip <= 0:
        clip = xd.abs().max()
    if xd.min() >= 0:  # unsigned grid for non-negative tensors
        scale, lo, hi = clip / (2**bits - 1), 0, 2**bits - 1
    else:
        scale, lo, hi = clip / 2 ** (bits - 1), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if scale == 0:
        return x.clone()
    # the scale keeps p - b significant bits (sawb.py), rounded from its fp32 value
    keep = round(-math.log2(torch.finfo(x.dtype).eps)) + 1 - bits
    mantissa, exponent = torch.frexp(scale.float())
    scale = torch.ldexp(torch.round(mantissa * 2.0**keep), exponent - keep).double()
    q = torch.clamp(torch.round(xd / scale), lo, hi) * scale
    return q.to(x.dtype)

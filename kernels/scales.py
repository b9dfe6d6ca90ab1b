"""Scale granularity of the quantizers: one scale per tensor, or one per row along a GEMM's K.

A quantizer (LUQ, SR, absmax) maps x to integer codes times a scale derived from max|x|. With
``dim=None`` there is one scale for the whole tensor; with ``dim=d`` there is one scale per slice
``x[..., i, ..., :, ...]`` along ``d`` (max|x| reduced over ``d`` only, keepdim). A GEMM stays exact
on such codes when ``d`` is its contracted dim K: row r of A and column c of B carry scales s_r
and t_c, and

    (diag(s) · A_codes) @ (B_codes · diag(t)) = diag(s) · (A_codes @ B_codes) · diag(t),

one integer GEMM and one rescale of its output by an outer product of two vectors. A scale that
varies along K would have to enter every product of the sum: no integer GEMM computes that.

Everything per tensor carries over slice by slice: unbiasedness, the exact variance formulas (with
each element's own slice scale), the all-zero and NaN rules (now per slice: a NaN makes its own
slice non-finite, not the whole tensor). The point of rows is the variance. SR's per-element
variance is (v - lo)(lo + 1 - v)·scale², at most scale²/4; per tensor the scale is set by the
largest row, so a row whose max is a fraction ρ of the tensor's has, relative to its own energy,
between ρ^-1 (values far below one level) and ρ^-2 times the noise its own scale would give it.
"""
from __future__ import annotations

from typing import Optional

import torch

GRANULARITIES = ("tensor", "row")  # the backend options ``scales`` / ``fwd_scales``


def scale_shape(shape: tuple, dim: Optional[int]) -> tuple:
    """The shape of the scales: () for one per tensor, else ``shape`` with 1 at ``dim`` (keepdim)."""
    return () if dim is None else (*shape[:dim], 1, *shape[dim + 1:])


def amax_of(xf: torch.Tensor, dim: Optional[int]) -> torch.Tensor:
    """max|xf| over the whole tensor (0-d) or over ``dim`` (keepdim: broadcasts against xf). NaN
    propagates; an empty reduction gives 0."""
    a = xf.abs()
    if dim is None:
        return a.amax() if a.numel() else torch.zeros((), device=xf.device)
    if a.shape[dim] == 0:
        return a.new_zeros(scale_shape(a.shape, dim))
    return a.amax(dim, keepdim=True)


def check_dim(x: torch.Tensor, dim: Optional[int], op: str) -> Optional[int]:
    """``dim`` normalized to 0..x.dim()-1 (None: per tensor), or a ValueError naming the bad value."""
    if dim is None:
        return None
    if not -x.dim() <= dim < x.dim() or x.dim() == 0:
        raise ValueError(f"nm.{op}: dim={dim} is out of range for an input of shape {tuple(x.shape)}; use a dim "
                         f"in -{x.dim()}..{x.dim() - 1}, or None for one scale per tensor")
    return dim % x.dim()

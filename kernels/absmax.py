"""absmax: round-to-nearest onto a per-tensor symmetric grid, the 8-bit forward quantizer.

Levels {c·scale : c = -L..L}, L = 2^(bits-1) - 1, with the scale of SR (``sr.sr_scale``): max|x| / L
rounded *up* to the significant bits that keep every level exact in x's dtype, so max|x| is never
clipped and the output is exactly integer codes times one scale (what an exact int8 GEMM needs).
Each element goes to its nearest level (half to even): deterministic and biased, like SAWB, with a
straight-through gradient. With ``dim``: one scale per slice along ``dim`` (``kernels/scales.py``);
with ``pow2``: SR's power-of-two scale (``sr.py``), whose coarser grid multiplies the rounding error's
variance (about scale²/12 per element for data spread over many levels) by r² in [1, 4).

Why not SAWB at 8 bits: SAWB's clip coefficients (c1, c2) are fitted for 4 bits and below, where
clipping the tails buys resolution for the bulk; at 8 bits the grid is fine enough that the
per-tensor max is the usual choice (the standard symmetric INT8 of inference and of int8 training
recipes), and it never clips an outlier. Per-tensor, so a tensor with a few large outliers spends
its 255 levels on their range.

``absmax_math`` is the portable implementation and the specification of the CPU kernel
(``nm_cpu.cpp``, ``nm_absmax``): the same fp32 operations, so both give the same bits.
"""
from __future__ import annotations

from typing import Optional

import torch

from .scales import amax_of, check_dim
from .sr import BITS, sr_levels, sr_scale


def check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"nm.absmax: bits must be in {BITS.start}..{BITS.stop - 1}, got bits={bits}")


def absmax_math(x: torch.Tensor, bits: int, dim: Optional[int] = None,
                pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(quantized x in x's dtype, the fp32 scale of its codes: 1 for an all-zero x, NaN/Inf with x),
    one scale per tensor or per slice along ``dim`` (keepdim)."""
    check_bits(bits)
    dim = check_dim(x, dim, "absmax")
    levels = float(sr_levels(bits))
    xf = x.float()
    amax = amax_of(xf, dim)
    scale = sr_scale(amax, x.dtype, bits, pow2)
    safe = torch.where(scale > 0, scale, 1.0)
    level = torch.round(xf / safe).clamp(-levels, levels)  # |x| / scale <= L already: a guard
    big = torch.finfo(x.dtype).max
    q = (level * scale).clamp(-big, big)  # only within one level of the dtype's largest value
    q = torch.where(amax > 0, q, xf)  # all-zero tensor: zeros
    q = torch.where(torch.isfinite(amax), q, xf + amax)  # propagate NaN/Inf everywhere
    return q.to(x.dtype), torch.where(amax == 0, 1.0, scale)

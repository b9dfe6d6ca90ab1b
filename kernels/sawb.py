"""SAWB: statistics-aware weight binning (Choi et al., 2018), round-to-nearest, per tensor.

clip = c1·sqrt(E[x²]) - c2·E|x|, scale = clip / 2^(b-1), q = clamp(round(x/scale), -2^(b-1),
2^(b-1)-1)·scale: exactly 2^b integer levels (the LUQ reference code clamps to ±2^(b-1), which is
17 levels for 4 bits). Where the SAWB clip is not positive (e.g. a constant tensor), max|x| is used.
"""
from __future__ import annotations

import torch

# (c1, c2) per bit width, as used by the LUQ reference code for its 4-bit forward quantizer.
SAWB_COEFFICIENTS: dict[int, tuple[float, float]] = {4: (12.1, 12.2)}


def sawb_math(x: torch.Tensor, bits: int) -> torch.Tensor:
    c1, c2 = SAWB_COEFFICIENTS[bits]
    half = 2.0 ** (bits - 1)
    xf = x.float()
    a = xf.abs()
    amax = a.amax()
    # x² overflows fp32 for |x| ≳ 1.8e19: there take the moments of x / max|x| (exactly x elsewhere)
    norm = torch.where(torch.isfinite((xf * xf).mean()) | ~torch.isfinite(amax), 1.0, amax)
    xs = xf / norm
    clip = (c1 * torch.sqrt((xs * xs).mean()) - c2 * xs.abs().mean()) * norm
    clip = torch.where(clip > 0, clip, amax)
    scale = clip / half
    safe = torch.where(scale > 0, scale, 1.0)
    q = torch.clamp(torch.round(xf / safe), -half, half - 1) * safe
    # the top level may exceed max|x| (clip > max|x|): saturate at x's dtype range, never overflow
    q = q.clamp(-torch.finfo(x.dtype).max, torch.finfo(x.dtype).max)
    q = torch.where(scale > 0, q, xf)  # all-zero tensor: zeros
    q = torch.where(torch.isfinite(scale), q, xf + scale)
    return q.to(x.dtype)

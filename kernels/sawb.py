"""SAWB: statistics-aware weight binning (Choi et al., 2018), round-to-nearest, per tensor.

clip = c1·sqrt(E[x²]) - c2·E|x|, scale = clip / 2^(b-1), q = clamp(round(x/scale), -2^(b-1),
2^(b-1)-1)·scale: exactly 2^b integer levels (the LUQ reference code clamps to ±2^(b-1), which is
17 levels for 4 bits). A tensor with no negative values gets the unsigned grid [0, 2^b - 1] with
scale clip/(2^b - 1): still exactly 2^b levels, all of them usable (the reference code's
2·clip/15 for activations leaves the upper half unused on ReLU outputs, whose clip is ≈ max).
Where the SAWB clip is not positive (e.g. a constant tensor), max|x| is used.

``sawb_math`` is the portable implementation (fp32 moments, x/max|x| where x² overflows); the CPU
kernel (``nm_cpu.cpp``) takes the moments in double and the scale from them, so the two agree to
the last bit of the scale.
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
    # Non-negative tensors (e.g. ReLU outputs) would use only half of a signed grid: give them the
    # unsigned grid [0, 2^b - 1] over [0, clip] instead, twice the resolution for the same clip.
    unsigned = xf.amin() >= 0
    scale = torch.where(unsigned, clip / (2 * half - 1), clip / half)
    lowest = torch.where(unsigned, 0.0, -half)
    highest = torch.where(unsigned, 2 * half - 1, half - 1)
    safe = torch.where(scale > 0, scale, 1.0)
    q = torch.minimum(torch.maximum(torch.round(xf / safe), lowest), highest) * safe
    # the top level may exceed max|x| (clip > max|x|): saturate at x's dtype range, never overflow
    q = q.clamp(-torch.finfo(x.dtype).max, torch.finfo(x.dtype).max)
    q = torch.where(scale > 0, q, xf)  # all-zero tensor: zeros
    q = torch.where(torch.isfinite(scale), q, xf + scale)
    return q.to(x.dtype)

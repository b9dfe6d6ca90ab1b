"""SAWB: statistics-aware weight binning (Choi et al., 2018), round-to-nearest, per tensor.

clip = c1·sqrt(E[x²]) - c2·E|x|, scale = clip / 2^(b-1), q = clamp(round(x/scale), -2^(b-1),
2^(b-1)-1)·scale: exactly 2^b integer levels (the LUQ reference code clamps to ±2^(b-1), which is
17 levels for 4 bits). A tensor with no negative values gets the unsigned grid [0, 2^b - 1] with
scale clip/(2^b - 1): still exactly 2^b levels, all of them usable (the reference code's
2·clip/15 for activations leaves the upper half unused on ReLU outputs, whose clip is ≈ max).
Where the SAWB clip is not positive (e.g. a constant tensor), max|x| is used.

The scale keeps only p - b significant bits (p: the precision of x's dtype, 24 for fp32, 8 for
bf16, 11 for fp16), so every level k·scale (|k| < 2^b) is exact in x's dtype: the values the op
returns are exactly integer codes times one scale, and a GEMM on the codes in float8 with the scale
applied afterwards (``lowering="native"``) computes the very same product. The rounding moves the
clip by at most 2^-(p-b+1) relative (3% in bf16, 5e-7 in fp32), well inside SAWB's own accuracy.

``sawb_math`` is the portable implementation (fp32 moments, x/max|x| where x² overflows); the CPU
kernel (``nm_cpu.cpp``) takes the moments in double and the scale from them, so the two agree to
the last bit of the scale.
"""
from __future__ import annotations

import math

import torch

# (c1, c2) per bit width, as used by the LUQ reference code for its 4-bit forward quantizer.
SAWB_COEFFICIENTS: dict[int, tuple[float, float]] = {4: (12.1, 12.2)}


def scale_bits(dtype: torch.dtype, bits: int) -> int:
    """Significant bits the SAWB scale keeps for ``dtype`` so that every ``bits``-bit level is exact."""
    precision = round(-math.log2(torch.finfo(dtype).eps)) + 1  # 24 fp32, 8 bf16, 11 fp16
    return precision - bits


def round_significand(scale: torch.Tensor, keep: int) -> torch.Tensor:
    """``scale`` (fp32) rounded half-to-even to ``keep`` significant bits (0, Inf, NaN unchanged)."""
    mantissa, exponent = torch.frexp(scale)
    return torch.ldexp(torch.round(mantissa * 2.0**keep), exponent - keep)


def sawb_math(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(quantized x in x's dtype, the fp32 scale: 0 for an all-zero x, non-finite with x)."""
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
    scale = round_significand(torch.where(unsigned, clip / (2 * half - 1), clip / half), scale_bits(x.dtype, bits))
    lowest = torch.where(unsigned, 0.0, -half)
    highest = torch.where(unsigned, 2 * half - 1, half - 1)
    safe = torch.where(scale > 0, scale, 1.0)
    q = torch.minimum(torch.maximum(torch.round(xf / safe), lowest), highest) * safe
    # the top level may exceed max|x| (clip > max|x|): saturate at x's dtype range, never overflow
    q = q.clamp(-torch.finfo(x.dtype).max, torch.finfo(x.dtype).max)
    q = torch.where(scale > 0, q, xf)  # all-zero tensor: zeros
    q = torch.where(torch.isfinite(scale), q, xf + scale)
    return q.to(x.dtype), scale

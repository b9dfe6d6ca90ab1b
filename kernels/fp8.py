"""Exact float8 codes of quantized tensors: what ``lowering="native"`` hands to FP8 GEMMs.

A quantized tensor is ``codes · scale`` with one fp32 scale per tensor; the codes are float8
numbers *exactly*, so a GEMM on the codes with fp32 accumulation, scaled afterwards, computes the
product of the quantized values themselves (``torch._scaled_mm`` with per-tensor scales).

- LUQ values are 0 or ±amax·2^(k-top), k = 0..top. With scale = amax·2^-E (E: the format's largest
  power-of-two exponent) the codes are ±2^(k-top+E), exact as long as E - top is not below the
  format's smallest subnormal exponent: top ≤ 17 in e4m3fn (LUQ ≤ 5 bits), top ≤ 31 in e5m2
  (6 bits); wider LUQ has no exact float8 form. The mean of ``smp`` > 1 samples is not a power of
  two in general, so it has none either (``luq_format`` says so).
- SAWB values are k·scale, |k| < 2^bits, with the scale rounded so that k·scale is exact in the
  tensor's dtype (``sawb.py``); e4m3fn holds every integer up to 16, so 4-bit codes are exact.

Both are derived from the quantizer's own output (one exact division), so the codes represent
precisely what ``lowering="emulate"`` computes with. (One exception: LUQ levels below the tensor
dtype's smallest subnormal, e.g. fp16 with 6-bit LUQ, where amax·2^-31 underflows fp16, are rounded
in the dtype itself; the CUDA kernels write the exact codes there, so the two differ in those tiny
values, the native one being the exact quantizer.)
"""
from __future__ import annotations

from typing import Optional

import torch

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
# format -> (largest power-of-two exponent, smallest subnormal exponent)
_EXPONENTS = {E4M3: (8, -9), E5M2: (15, -16)}
FORMAT_NAMES = {E4M3: "e4m3", E5M2: "e5m2"}


def luq_format(top: int, samples: int) -> tuple[Optional[torch.dtype], str]:
    """The float8 format holding LUQ codes with exponents 0..``top`` exactly, or (None, why not)."""
    if samples > 1:
        return None, (f"the mean of smp={samples} LUQ samples is not a power of two times the scale, "
                      "so it has no exact float8 form (an exact GEMM per sample would cost as much as the "
                      "high-precision one)")
    for fmt in (E4M3, E5M2):
        largest, smallest = _EXPONENTS[fmt]
        if largest - top >= smallest:
            return fmt, ""
    return None, (f"LUQ with {top + 1} magnitudes spans 2^{top}; float8 holds at most 32 consecutive "
                  "powers of two (e5m2), so LUQ above 6 bits has no exact float8 form")


def luq_codes(y: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale) with codes·scale == y for a LUQ output ``y`` (exact; non-finite y gives NaN codes).

    An amax below 2^-118 (fp32) would make the scale underflow; gradients never get there."""
    fmt, why = luq_format(top, 1)
    assert fmt is not None, why
    largest = _EXPONENTS[fmt][0]
    yf = y.float()
    amax = yf.abs().amax()
    codes = torch.where(amax == 0, 0.0, yf / amax * 2.0**largest)  # a power of two, exactly
    scale = torch.where(amax == 0, 1.0, amax * 2.0**-largest)
    return _cast_like(y, codes, fmt), scale


def sawb_codes(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale) with codes·scale == q for a SAWB output ``q`` and its scale (exact)."""
    codes = torch.where(scale == 0, 0.0, q.float() / scale)  # an integer |k| <= 16, exactly
    return _cast_like(q, codes, E4M3), torch.where(scale == 0, 1.0, scale).float()


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes·scale in ``dtype``: the quantizer's output again, bit for bit."""
    return (codes.float() * scale).to(dtype)


def _cast_like(x: torch.Tensor, values: torch.Tensor, fmt: torch.dtype) -> torch.Tensor:
    """``values`` as ``fmt`` in x's memory layout (what the ops' fake kernels promise)."""
    return torch.empty_like(x, dtype=fmt).copy_(values)

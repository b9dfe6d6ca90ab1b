"""Exact int8 codes of quantized tensors, and the one rounding of an int8 GEMM's result.

A quantized tensor is ``codes · scale`` with integer codes |c| <= 127 and one fp32 scale per tensor
(``catalog.Form.int8``): LUQ4's 0, ±1, ±2, .., ±64 times amax·2^-6, SAWB4's -8..7 (or 0..15), SR and
absmax up to 8 bits. An int8 GEMM sums the codes' products in int32, exactly while no sum leaves
int32 (``gemm.int8_mm`` splits K so that none can), and one multiply by scale_a·scale_b (exact in
float64: two 24-bit significands) gives the product of the quantized values, rounded once to the
output dtype: more exact than an fp32 GEMM on the same values, which rounds at every addition.

Rounding "once" from float64: the int32 sum times the scale product is rounded to float64 first
(2^-53 relative); to fp32 that differs from the exact rounding only where the float64 lands exactly
on an fp32 tie, which a product of a <= 31-bit integer and a 48-bit scale can do only when the exact
value is within 2^-53 of that tie. bf16/fp16 outputs go through fp32 rounded to odd
(``round_via_odd``), which rounds like rounding the float64 directly (24 >= 2·11 + 2 bits).
All of it is plain aten ops, so that Inductor fuses it into the GEMM output's consumer.

Power-of-two scales (the quantizers' ``pow2``) make the rescale cheap: scale_a·scale_b is then a power
of two, exact in fp32, and so is the product of the sums' fp32 value with it. The int32 (or int64)
sums are rounded once, to fp32, and that is the exact product rounded once wherever it is a normal
fp32 number (a subnormal result rounds a second time). A bias is then added in fp32 and the sum
rounded to the output dtype, as a GEMM's epilogue does; bf16/fp16 outputs are rounded from fp32 (at
most two roundings, against the hundreds of an fp32-accumulating GEMM). No float64 anywhere: on a
CPU, float64 vectors hold half the lanes, and the round-to-odd step does not vectorize.
"""
from __future__ import annotations

from typing import Optional

import torch

INT8_MAX = 127  # codes are symmetric: -127..127 (SAWB's unsigned grid: 0..2^bits - 1)


def int8_codes(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The int8 codes c with c·scale == values (exact; the portable path of the codes ops), in
    values' layout. Non-finite scales (NaN/Inf inputs) give codes 0."""
    codes = torch.where(torch.isfinite(scale) & (scale != 0), values.float() / scale, 0.0)
    return torch.empty_like(values, dtype=torch.int8).copy_(codes)


def round_via_odd(d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 ``d`` rounded once to ``dtype``: fp32 directly, bf16/fp16 through fp32 rounded to odd
    (truncated toward zero, last bit set where inexact)."""
    f = d.float()
    if dtype == torch.float32:
        return f
    back = f.double()
    bits = f.view(torch.int32) - (back.abs() > d.abs()).to(torch.int32)  # one ulp toward zero
    bits = torch.where(back != d, bits | 1, bits)
    return bits.view(torch.float32).to(dtype)


def scaled_sums(sums: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, bias: Optional[torch.Tensor],
                dtype: torch.dtype, pow2: bool = False) -> torch.Tensor:
    """``dtype``(sums · scale_a · scale_b + bias) from an int8 GEMM's exact integer sums, computed in
    float64 and rounded once; with ``pow2`` (both scales powers of two, which is not checked) computed
    in fp32, the product rounded once (see the module docstring)."""
    if pow2:
        out = sums.float() * (scale_a * scale_b)  # a power of two: only the sums' conversion rounds
        if bias is not None:
            out = out + bias.to(dtype).float()
        return out.to(dtype)
    d = sums.double() * (scale_a.double() * scale_b.double())
    if bias is not None:
        d = d + bias.to(dtype).double()
    return round_via_odd(d, dtype)

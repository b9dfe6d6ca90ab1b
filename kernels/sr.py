"""SR: uniform stochastic rounding to INT ``bits``, per tensor (the baseline the LUQ paper compares against).

Levels {c·scale : c = -L..L} with L = 2^(bits-1) - 1 magnitudes (sign + magnitude fit in ``bits``)
and one scale per tensor, scale ≈ max|x| / L. Every element is rounded stochastically to one of its
two neighbouring levels: with v = |x| / scale, lo = floor(v),

    c = lo + [u < v - lo],   out = sign(x) · c · scale,

so E[out] = x and Var(out) = (v - lo)(lo + 1 - v) · scale² per element. One uniform per element and
sample; ``samples`` samples are averaged (the per-sample codes summed in order, divided by
``samples``), which divides the variance by ``samples``. "E[out] = x" up to the fp32 rounding of v
(half an fp32 ulp of v) and the 2^-24 grid of the uniforms (P(up) = ceil((v - lo)·2^24)·2^-24):
|E[out] - x| ≤ 2^-24·(v + 1)·scale, as for LUQ.

The scale is exact by construction. It is amax / L rounded *up* (toward +inf) to keep = p - bits
significant bits, p the precision of x's dtype (24 fp32, 8 bf16, 11 fp16; ``sawb.scale_bits``; a
value has at least one significant bit, so keep = 0, bf16 at 8 bits, gives a power of two):

- exactness: a level c·scale with |c| ≤ L < 2^(bits-1) has at most (p - bits) + (bits - 1) = p - 1
  significant bits, so it is exact in x's dtype (and in fp32, where it is computed). With one sample
  the output is exactly integer codes times one scale, which is what an exact int8 / float8 GEMM on
  the codes needs.
- unbiasedness: rounding up gives scale ≥ amax / L, so v = |x| / scale ≤ L for every element and
  nothing is ever clipped (rounding to nearest could put max|x| above L·scale, where it would have
  to be clamped: biased). fp32 division is monotone and L is exact, so the computed v ≤ L too; the
  clamp of v to L in the math below never changes a value and is only a guard.

Where the scale would be a subnormal of x's dtype (max|x| itself subnormal in that dtype, e.g. fp16
gradients all below 6e-5), keep significant bits would not be enough: the levels must also be
multiples of the dtype's smallest subnormal 2^s (s = -149 fp32, -133 bf16, -24 fp16) to be exact
in it. So the rounding quantum of the scale is max(2^(e - keep), 2^s) (scale = m·2^e, m in [0.5, 1)):
still rounded up, so still unbiased and never clipped, and every level exact. For any normal max|x|
this is the plain keep-bit rounding (2^(e - keep) ≥ 2^(s+1) there). It also keeps a tiny or
subnormal max|x| finite: the scale never underflows to 0, so |x| / scale never divides by zero
(LUQ divides by max|x| first for the same reason; here the scale itself is safe).

The scale is computed in float64 from amax (an exact quotient amax / L up to 53 bits, then exact
power-of-two scaling, ceil and scaling back): rounding the float64 quotient up gives the same scale
as rounding the exact quotient up (a grid point q can only be the double nearest to amax / L if
amax = L·q exactly: amax - L·q is 0 or at least min(2^-25·amax, 2^s), far above the 2^-53·amax
that rounding to a double could hide). Powers of two
are built from their bits, since ``torch.ldexp`` computes 2^e in the default dtype and would
underflow below 2^-149.

Top of the range: where max|x| lies within a relative 2^(1-keep) of the dtype's largest finite
value, the level above an element may exceed it (fp16 at 4 bits: max|x| > 65408 gives a top level
of 66304), and for bits = 2 in fp32/bf16 the scale itself may round up past fp32's range. The scale
is then capped at fp32's largest keep-bit value and the output saturates at ±(the dtype's largest
finite value), as SAWB does: finite, and biased only for elements within one level of that largest
value. Gradients in that range have already overflowed in any practical sense.

NaN/Inf anywhere make the whole output non-finite (``xf + amax``), an all-zero tensor gives zeros,
as ``luq_math``. With ``dim`` there is one scale per slice along ``dim`` (``kernels/scales.py``) and
every rule above holds slice by slice.

With ``pow2`` the scale is rounded up to a power of two instead (keep = 1 significant bit; MX formats
share exponents so): every rule above still holds, and an int8 GEMM on two such operands rescales its
integer sums by one power of two, exactly in fp32 (``int8.scaled_sums``). The grid is coarser by the
factor r = scale_pow2 / scale in [1, 2): every element's variance (v - lo)(lo + 1 - v)·scale² is at most
scale_pow2²/4, and where the levels are fine against the spread of x (frac(v) about uniform, as for
8 bits) the expected variance grows by r², 1 to 4, about 3 / (2 ln 2) ≈ 2.16 for a max|x| spread
uniformly over an octave in log scale. ``sr_math`` is the portable implementation and the specification of
the CPU kernel (``nm_cpu.cpp``, ``nm_sr``) and the Triton kernel (``cuda.sr``; one scale per tensor): the same
fp32 operations in the same order, so all three give the same bits.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .sawb import scale_bits
from .scales import amax_of, check_dim

BITS = range(2, 9)
# The CPU kernels take bits and this flag in one int (nm_cpu.cpp kPow2Scale): power-of-two scales.
POW2_FLAG = 1 << 8


def sr_levels(bits: int) -> int:
    """L = 2^(bits-1) - 1, the number of nonzero magnitudes."""
    return 2 ** (bits - 1) - 1


def kernel_bits(bits: int, pow2: bool) -> int:
    """The int the CPU kernels of SR and absmax take: ``bits``, with ``POW2_FLAG`` for power-of-two scales."""
    return bits | (POW2_FLAG if pow2 else 0)


def check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"nm.sr: bits must be in 2..8, got bits={bits}")


def subnormal_exponent(dtype: torch.dtype) -> int:
    """s with 2^s the smallest positive subnormal of ``dtype`` (-149 fp32, -133 bf16, -24 fp16)."""
    info = torch.finfo(dtype)
    return round(math.log2(info.smallest_normal * info.eps))  # Python floats: no tensor in a traced graph


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """2^exponent (float64), exactly, for integer exponents in [-1022, 1023]: built from its bits."""
    return ((exponent.to(torch.int64) + 1023) << 52).view(torch.float64)


def round_up_significand(scale: torch.Tensor, keep: int, min_exponent: int | None = None) -> torch.Tensor:
    """``scale`` rounded toward +inf to ``keep`` significant bits (0, Inf, NaN unchanged), in its dtype.

    With scale = m·2^e (m in [0.5, 1)) the result is the smallest multiple of 2^(e - keep) that is
    ≥ scale; with ``min_exponent`` the quantum is at least 2^min_exponent. A value has at least one
    significant bit: keep ≤ 0 rounds up to a power of two, as keep = 1 (bf16 at 8 bits has
    keep = p - bits = 0). Computed in float64 (exact); the result is exact in scale's dtype wherever
    it is representable there (for fp32: a quantum of at least 2^-149, below fp32's largest value)."""
    s = scale.double()
    _, exponent = torch.frexp(s)
    shift = exponent.to(torch.int64) - max(keep, 1)
    if min_exponent is not None:
        shift = shift.clamp_min(min_exponent)
    rounded = torch.ceil(s * _pow2(-shift)) * _pow2(shift)
    return torch.where(torch.isfinite(s) & (s != 0), rounded, s).to(scale.dtype)


def largest_scale(keep: int) -> float:
    """fp32's largest value with max(keep, 1) significant bits: the cap of the scale."""
    k = max(keep, 1)
    return (2.0**k - 1.0) * 2.0 ** (128 - k)


def sr_scale(amax: torch.Tensor, dtype: torch.dtype, bits: int, pow2: bool = False) -> torch.Tensor:
    """The per-tensor scale (fp32, 0-d) for max|x| = ``amax`` (fp32): amax / L rounded up to
    ``scale_bits(dtype, bits)`` significant bits (with ``pow2``: to a power of two) and to a multiple
    of the dtype's smallest subnormal, capped at fp32's largest such value. 0 for amax = 0; NaN for NaN."""
    keep = 1 if pow2 else scale_bits(dtype, bits)
    scale = round_up_significand(amax.double() / sr_levels(bits), keep, subnormal_exponent(dtype))
    return torch.clamp_max(scale, largest_scale(keep)).float()  # NaN stays NaN, Inf is capped


def sr_math(x: torch.Tensor, u: torch.Tensor, bits: int, dim: Optional[int] = None,
            pow2: bool = False) -> torch.Tensor:
    """Quantize ``x`` with uniforms ``u`` of shape ``(samples, *x.shape)``, one scale per tensor or per
    slice along ``dim`` (with ``pow2``: powers of two); returns the mean of the samples in x's dtype.
    NaN/Inf anywhere make the whole output (its slice's) non-finite."""
    check_bits(bits)
    dim = check_dim(x, dim, "sr")
    if x.numel() == 0:
        return torch.empty_like(x)
    levels = sr_levels(bits)
    xf = x.float()
    amax = amax_of(xf, dim)
    scale = sr_scale(amax, x.dtype, bits, pow2)
    safe = torch.where(scale > 0, scale, 1.0)  # all-zero tensor (its output is x below)
    v = torch.clamp_max(xf.abs() / safe, float(levels))  # ≤ L already (see the module docstring)
    lo = torch.floor(v)
    frac = v - lo  # exact
    # The per-sample codes lo + [u < frac], summed in order (integers: exact), then divided.
    samples = u.shape[0]
    codes = lo + (u[0].float() < frac).to(torch.float32)
    for s in range(1, samples):
        codes = codes + (lo + (u[s].float() < frac).to(torch.float32))
    q = torch.sign(xf) * ((codes / samples) * scale)  # one sample: c·scale, exact
    big = torch.finfo(x.dtype).max
    q = q.clamp(-big, big)  # only within one level of the dtype's largest value (docstring)
    q = torch.where(amax > 0, q, xf)  # all-zero tensor: zeros
    q = torch.where(torch.isfinite(amax), q, xf + amax)  # propagate NaN/Inf everywhere
    return q.to(x.dtype)


def sr_scale_of(x: torch.Tensor, bits: int, dim: Optional[int] = None, pow2: bool = False) -> torch.Tensor:
    """The scale of x's SR codes (one sample: the output is codes |c| <= L times it, exactly), per
    tensor or per slice along ``dim`` (keepdim); 1 for an all-zero x (slice), non-finite with it."""
    amax = amax_of(x.float(), check_dim(x, dim, "sr"))
    scale = torch.where(torch.isfinite(amax), sr_scale(amax, x.dtype, bits, pow2), amax)  # Inf: not capped here
    return torch.where(amax == 0, 1.0, scale)

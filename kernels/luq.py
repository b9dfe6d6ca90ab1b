"""LUQ: logarithmic unbiased quantization (Chmiel et al., ICLR 2023), per tensor or per row.

Levels {0} ∪ {±α·2^k, k = 0..L-1} with α = max|x| / 2^(L-1), so max|x| is a level and nothing is
ever clipped. Below α: stochastic underflow to 0 or α; inside an octave [2^k α, 2^(k+1) α):
stochastic rounding to its two ends, with probabilities that make every element unbiased.
One uniform per element and sample; ``smp`` samples are averaged (variance / smp). ``luq_math`` is
the portable implementation and the specification of the CPU kernel (``nm_cpu.cpp``). With ``dim``,
α is per slice along ``dim`` (``kernels/scales.py``), and so is everything said here.
"""
from __future__ import annotations

import enum
from typing import Optional

import torch

from .scales import amax_of, check_dim


class Levels(str, enum.Enum):
    """How many magnitudes LUQ's ``bits`` hold (``luq_levels``). A str: ops take and JSON writes its value."""

    STRICT = "strict"  # 2^(bits-1)-1: sign and exponent fit in ``bits``
    REFERENCE = "reference"  # 2^(bits-1), as the paper's code

    __str__ = str.__str__


LEVEL_KINDS = tuple(Levels)


def luq_levels(bits: int, levels: str) -> int:
    """Number of nonzero magnitudes L: 2^(bits-1)-1 ("strict", fits sign+exponent in ``bits``)
    or 2^(bits-1) ("reference", as the paper's code)."""
    return 2 ** (bits - 1) - (1 if levels == Levels.STRICT else 0)


def luq_noise_shape(shape: torch.Size | tuple, samples: int) -> tuple:
    return (samples, *tuple(shape))


def luq_scale(x: torch.Tensor, bits: int, levels: str, dim: Optional[int] = None) -> torch.Tensor:
    """α = max|x|·2^-top (fp32; per slice along ``dim``, keepdim): LUQ's output is integer codes 0, ±1,
    ±2, .., ±2^top times α (one sample), exactly wherever α is a normal fp32 number (max|x| above
    2^-120). 1 for an all-zero x (slice)."""
    amax = amax_of(x.float(), check_dim(x, dim, "luq"))
    return torch.where(amax == 0, 1.0, amax * 2.0 ** -(luq_levels(bits, levels) - 1))


def luq_math(x: torch.Tensor, u: torch.Tensor, bits: int, levels: str, dim: Optional[int] = None) -> torch.Tensor:
    """Quantize ``x`` with uniforms ``u`` of shape ``(samples, *x.shape)``, α per tensor or per slice along
    ``dim``; returns the mean of the samples in x's dtype. NaN/Inf anywhere make the whole output (its
    slice's) non-finite."""
    top = luq_levels(bits, levels) - 1  # largest exponent k
    dim = check_dim(x, dim, "luq")
    if x.numel() == 0:
        return torch.empty_like(x)
    xf = x.float()
    amax = amax_of(xf, dim)
    # r = |x| / α with α = amax / 2^top, written so that a tiny (denormal) amax, whose α would
    # underflow to 0, still gives finite levels (bit-identical to |x| / α wherever α is normal).
    r = xf.abs() / amax * 2.0**top  # in units of α, within [0, 2^top]
    k = torch.floor(torch.log2(r)).clamp(0, top)
    low = torch.exp2(k)
    # log2 may round across an octave boundary: move the bin so that low <= r < 2·low.
    low = torch.where((low > r) & (k > 0), low * 0.5, low)
    low = torch.where((2 * low <= r) & (low < 2.0**top), low * 2.0, low)
    under = r < 1
    base = torch.where(under, 0.0, low)
    width = torch.where(under, 1.0, low)
    p_up = (r - base) / width
    # Samples summed in order, one comparison each (the CPU kernel adds them in the same order).
    samples = u.shape[0]
    ups = (u[0].float() < p_up).to(torch.float32)
    for s in range(1, samples):
        ups = ups + (u[s].float() < p_up).to(torch.float32)
    units = base + width * (ups / samples)
    q = torch.sign(xf) * (units * 2.0**-top) * amax  # scaled first: 2·2^127 would overflow
    q = torch.where(amax > 0, q, xf)  # all-zero tensor: zeros
    q = torch.where(torch.isfinite(amax), q, xf + amax)  # propagate NaN/Inf everywhere
    return q.to(x.dtype)

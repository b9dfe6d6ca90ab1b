"""Eager functional API: the same ops the graph pass inserts, with randomness drawn here."""
from __future__ import annotations

import torch

import nmcompile.kernels  # noqa: F401  (registers torch.ops.nm.*)
from nmcompile.kernels.luq import LEVEL_KINDS
from nmcompile.kernels.ops import luq_drawn, mvue_drawn
from nmcompile.kernels.sawb import SAWB_COEFFICIENTS
from nmcompile.passes.config import LUQ_BITS, _choice, _int_in, parse_pattern


def _check_dim(x: torch.Tensor, dim: int) -> int:
    if not -x.dim() <= dim < x.dim() or x.dim() == 0:
        raise ValueError(f"dim={dim} is out of range for a tensor with {x.dim()} dimensions")
    return dim % x.dim()


def _check_float(x: torch.Tensor, name: str) -> None:
    if not x.is_floating_point():
        raise ValueError(f"nmcompile.{name} needs a floating-point tensor, got dtype {x.dtype}")


def mvue(x: torch.Tensor, pattern: str = "2:4", dim: int = -1) -> torch.Tensor:
    """Minimum-variance unbiased N:M pruning along ``dim``: E[mvue(x)] = x, ≤ N nonzeros per group
    of M. A trailing remainder (size not divisible by M) is returned dense."""
    _check_float(x, "mvue")
    n, m = parse_pattern(pattern, "pattern")
    dim = _check_dim(x, dim)
    return mvue_drawn(x, n, m, dim)


def greedy(x: torch.Tensor, pattern: str = "2:4", dim: int = -1) -> torch.Tensor:
    """Keep the N largest magnitudes of every group of M along ``dim`` (biased baseline)."""
    _check_float(x, "greedy")
    n, m = parse_pattern(pattern, "pattern")
    return torch.ops.nm.greedy(x, n, m, _check_dim(x, dim))


def luq(x: torch.Tensor, bits: int = 4, samples: int = 1, levels: str = "strict") -> torch.Tensor:
    """Logarithmic unbiased quantization to ``bits`` (1 sign + bits-1 exponent bits), averaged
    over ``samples`` independent draws (SMP)."""
    _check_float(x, "luq")
    _int_in("bits", bits, LUQ_BITS)
    _int_in("samples", samples, range(1, 65))
    _choice("levels", levels, LEVEL_KINDS)
    return luq_drawn(x, bits, levels, samples)


def sawb(x: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """SAWB round-to-nearest ``bits``-bit quantization; straight-through in backward."""
    _check_float(x, "sawb")
    _int_in("bits", bits, tuple(sorted(SAWB_COEFFICIENTS)))
    return torch.ops.nm.sawb(x, bits)

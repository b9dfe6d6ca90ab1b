"""Eager functional API: the same ops the graph pass inserts, with randomness drawn here."""
from __future__ import annotations

import torch

from nmcompile.kernels.catalog import GREEDY, LUQ, MVUE, SAWB
from nmcompile.kernels.luq import LEVEL_KINDS
from nmcompile.passes.config import _choice, _int_in, parse_pattern


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
    return MVUE.apply(x, n=n, m=m, dim=dim)


def greedy(x: torch.Tensor, pattern: str = "2:4", dim: int = -1) -> torch.Tensor:
    """Keep the N largest magnitudes of every group of M along ``dim`` (biased baseline)."""
    _check_float(x, "greedy")
    n, m = parse_pattern(pattern, "pattern")
    return GREEDY.apply(x, n=n, m=m, dim=_check_dim(x, dim))


def luq(x: torch.Tensor, bits: int = 4, samples: int = 1, levels: str = "strict") -> torch.Tensor:
    """Logarithmic unbiased quantization to ``bits`` (1 sign + bits-1 exponent bits), averaged
    over ``samples`` independent draws (SMP)."""
    _check_float(x, "luq")
    _int_in("bits", bits, LUQ.bits)
    _int_in("samples", samples, range(1, 65))
    _choice("levels", levels, LEVEL_KINDS)
    return LUQ.apply(x, bits=bits, levels=levels, samples=samples)


def sawb(x: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """SAWB round-to-nearest ``bits``-bit quantization; straight-through in backward."""
    _check_float(x, "sawb")
    _int_in("bits", bits, SAWB.bits)
    return SAWB.apply(x, bits=bits)

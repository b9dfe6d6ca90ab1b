"""A random Hadamard rotation along a GEMM's K, around a gradient quantizer.

For a GEMM ``A @ B`` contracting K, any orthogonal R along K leaves the product unchanged:
``(A R) @ (Rᵀ B) = A @ B``. With R = D·H, D a diagonal of random signs and H block-diagonal
Sylvester-Hadamard blocks of size b scaled by 1/√b (so H Hᵀ = I), the rotated operand ``A R`` spreads
each block's outliers over the whole block: its values look Gaussian, and a max-scaled quantizer
wastes fewer levels on one large value (the random-Hadamard transforms of NVFP4 training recipes).

Here the rotation wraps the quantizer q of the gradient operand: ``q(g R) Rᵀ``. It is unbiased for
g whenever q is (E[q(g R)] Rᵀ = g R Rᵀ = g, for every draw of the signs), and since Rᵀ is
orthogonal its total variance is q's own at the rotated input: E‖q(gR)Rᵀ − g‖² = E‖q(gR) − gR‖².
The rotated values are computed in fp32; the result returns to g's dtype once, at the end (half an
ulp of bf16 under autocast, against the quantizer's noise of a quarter of a level or more).

The GEMM then runs on ``q(g R) Rᵀ`` in the input dtype: the codes live in the rotated basis, and an
exact low-precision GEMM on them needs the other operand rotated and quantized too, which is not
built (the lowering says so per GEMM).
"""
from __future__ import annotations

from typing import Callable

import torch

from .random import draw_seed, uniform

BLOCKS = tuple(2**i for i in range(1, 9))  # block sizes b of H: powers of two, 2..256


def check_block(block: int, k, what: str = "") -> str:
    """'' if blocks of ``block`` tile a K of size ``k``, else why not."""
    if not isinstance(k, int):
        return f"hadamard {block} skipped{what}: symbolic K={k}"
    if k % block:
        return f"hadamard {block} skipped{what}: K={k} is not a multiple of the block size"
    return ""


def signs(seed: torch.Tensor, k: int, device: torch.device) -> torch.Tensor:
    """±1.0 (fp32), one per position along K, from ``seed`` (counter-based, as the quantizers' uniforms)."""
    return torch.where(uniform(seed, (k,), device) < 0.5, -1.0, 1.0)


def hadamard_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """x times block-diagonal Sylvester-Hadamard blocks of size ``block`` along its last dim, scaled by
    1/√block: orthogonal and symmetric, so it is its own inverse. log2(block) butterfly stages of adds."""
    shape, k = x.shape, x.shape[-1]
    h = 1
    while h < block:  # stage h: within every 2h positions, (a, c) -> (a + c, a - c) for a h apart from c
        pairs = x.reshape(*shape[:-1], k // (2 * h), 2, h)
        a, c = pairs.unbind(-2)
        x = torch.stack((a + c, a - c), dim=-2)
        h *= 2
    return x.reshape(shape) * block**-0.5


def rotate(x: torch.Tensor, d: torch.Tensor, dim: int, block: int) -> torch.Tensor:
    """x R along ``dim`` (R = diag(d)·H, in fp32)."""
    y = x.to(torch.float32).movedim(dim, -1) * d
    return hadamard_blocks(y, block).movedim(-1, dim)


def unrotate(y: torch.Tensor, d: torch.Tensor, dim: int, block: int) -> torch.Tensor:
    """y Rᵀ along ``dim`` (Rᵀ = H·diag(d)), in fp32."""
    return (hadamard_blocks(y.to(torch.float32).movedim(dim, -1), block) * d).movedim(-1, dim)


def rotated(quantize: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dim: int, block: int,
            seed: torch.Tensor | None = None) -> torch.Tensor:
    """``quantize(x R) Rᵀ`` in x's dtype, with fresh signs (a seed from torch's generator unless given)."""
    dim = dim % x.dim()
    if seed is None:
        seed = draw_seed(x.device)
    d = signs(seed, x.shape[dim], x.device)
    return unrotate(quantize(rotate(x, d, dim, block)), d, dim, block).to(x.dtype)

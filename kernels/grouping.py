"""Views of a tensor as groups of M consecutive elements along one dimension.

A trailing remainder (size along ``dim`` not divisible by M) is kept apart and left dense.
"""
from __future__ import annotations

import torch


def split_groups(x: torch.Tensor, m: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(body, tail)``: body is ``[..., G, m]`` with ``dim`` moved last, tail the remainder."""
    moved = x.movedim(dim, -1)
    k = moved.shape[-1]
    full = (k // m) * m
    body = moved[..., :full].reshape(*moved.shape[:-1], k // m, m)
    return body, moved[..., full:]


def merge_groups(body: torch.Tensor, tail: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of :func:`split_groups`; always returns a new contiguous tensor."""
    flat = torch.cat([body.flatten(-2), tail.to(body.dtype)], dim=-1)
    return flat.movedim(-1, dim).contiguous()


def uniform_shape(shape: torch.Size | tuple, m: int, dim: int) -> tuple:
    """Shape of the per-group uniforms for a tensor of ``shape`` grouped by ``m`` along ``dim``."""
    shape = tuple(shape)
    dim = dim % len(shape)
    rest = shape[:dim] + shape[dim + 1 :]
    return (*rest, shape[dim] // m)


def memory_order(x: torch.Tensor) -> list:
    """Dims of ``x`` from outermost to innermost in memory (logical order when strides are symbolic)."""
    return stride_order(x.stride())


def stride_order(strides) -> list:
    """Dims from the largest stride to the smallest, ties in logical order."""
    if not all(isinstance(s, int) for s in strides):
        return list(range(len(strides)))
    return sorted(range(len(strides)), key=lambda d: (-strides[d], d))


class UnrolledGroups:
    """``x`` seen in memory order as groups of M along ``dim``, unrolled into M strided slices.

    Math on the slices is pointwise over [..., G, ...], whichever dim is grouped; :meth:`assemble`
    returns the result in x's own memory layout (a transposed gradient operand stays transposed:
    no copy, and BLAS takes either).
    """

    def __init__(self, x: torch.Tensor, m: int, dim: int):
        self.dim = dim % x.dim()
        self.order = memory_order(x)
        mem = x.permute(self.order)
        self.d = self.order.index(self.dim)
        k = mem.shape[self.d]
        full = (k // m) * m
        body = mem.narrow(self.d, 0, full).unflatten(self.d, (k // m, m))
        self.slices = [body.select(self.d + 1, i) for i in range(m)]
        self.tail = mem.narrow(self.d, full, k - full)

    def per_group(self, u: torch.Tensor) -> torch.Tensor:
        """Per-group values of ``uniform_shape`` (groups last) aligned with the slices."""
        return u.movedim(-1, self.dim).permute(self.order)

    def assemble(self, outs: list, dtype: torch.dtype) -> torch.Tensor:
        out = torch.stack(outs, self.d + 1).flatten(self.d, self.d + 1).to(dtype)
        if not (isinstance(self.tail.shape[self.d], int) and self.tail.shape[self.d] == 0):  # no cat copy
            out = torch.cat([out, self.tail.to(dtype)], self.d)
        inverse = sorted(range(len(self.order)), key=lambda i: self.order[i])
        return out.permute(inverse)

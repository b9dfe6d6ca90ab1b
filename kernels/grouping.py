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

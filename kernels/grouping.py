"""Views of a tensor as groups of M consecutive elements along one dimension, and the plans that
map any dense layout onto the flat views the kernels (CPU and CUDA) walk.

A trailing remainder (size along ``dim`` not divisible by M) is kept apart and left dense.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch

from .scales import scale_shape


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


# -- layout plans for the kernels -------------------------------------------------------------

def _merge(sizes: list, strides: list, *more: list) -> tuple:
    """Merge adjacent dims (outer to inner) whose strides nest, in ``strides`` and every list of ``more``
    alike; drop size-1 dims. Returns (sizes, strides, *more) merged."""
    lists = (strides, *more)
    out_sizes, outs = [], [[] for _ in lists]
    for i, size in enumerate(sizes):
        if size == 1:
            continue
        if out_sizes and all(out[-1] == given[i] * size for out, given in zip(outs, lists)):
            out_sizes[-1] *= size
            for out, given in zip(outs, lists):
                out[-1] = given[i]
        else:
            out_sizes.append(size)
            for out, given in zip(outs, lists):
                out.append(given[i])
    return (out_sizes, *outs)


def _offsets(sizes: list, strides: list) -> torch.Tensor:
    """int64 offsets Σ idx_d·stride_d over the row-major index space of ``sizes``."""
    off = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(sizes, strides):
        off = off.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride
    return off.reshape(-1).contiguous()


def is_dense(x: torch.Tensor) -> bool:
    return x.permute(memory_order(x)).is_contiguous()


@functools.lru_cache(maxsize=512)
def group_plan(shape: tuple, stride: tuple, dim: int, m: int, u_shape: tuple, u_stride: tuple):
    """[outer, k, inner] view of a dense tensor grouped by ``m`` along ``dim``, and the uniform
    offsets; None when the inner dims cannot be merged for both (then x is made contiguous)."""
    order = stride_order(stride)
    d = order.index(dim)
    # the uniforms seen like x: their group dim (last) moved to ``dim``, then in x's memory order
    u_dims = list(range(len(u_shape) - 1))
    u_dims.insert(dim, len(u_shape) - 1)
    u_view_stride = [u_stride[u_dims[q]] for q in order]
    sizes = [shape[q] for q in order]
    outer_sizes, inner_sizes = sizes[:d], sizes[d + 1:]
    merged_inner, u_inner = _merge(inner_sizes, u_view_stride[d + 1:])
    if len(merged_inner) > 1:
        return None
    inner = merged_inner[0] if merged_inner else 1
    outer_m, outer_strides = _merge(outer_sizes, u_view_stride[:d])
    return (math.prod(outer_sizes), shape[dim], inner, _offsets(outer_m, outer_strides),
            u_view_stride[d], u_inner[0] if u_inner else 0)


@functools.lru_cache(maxsize=512)
def flat_plan(shape: tuple, stride: tuple, *companions: tuple):
    """[outer, inner] memory-order view of a dense tensor, and for each companion index space (its
    strides per element of x's logical shape: the uniforms, the per-slice scales) its offsets per
    outer index and its stride along inner: (outer, inner, ((offsets, inner stride), ...))."""
    order = stride_order(stride)
    sizes = [shape[q] for q in order]
    merged, *merged_c = _merge(sizes, *([c[q] for q in order] for c in companions))
    if not merged:
        merged, merged_c = [1], [[0] for _ in companions]
    plans = tuple((_offsets(merged[:-1], c[:-1]), c[-1]) for c in merged_c)
    return math.prod(merged[:-1]), merged[-1], plans


def contiguous_strides(shape) -> tuple:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return tuple(reversed(strides))


def prepare(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(source, out): out as the op's fake kernel makes it (x's layout when dense); source with
    out's strides."""
    out = torch.empty_like(x)
    if not is_dense(x) or x.stride() != out.stride():
        x = torch.empty_like(out).copy_(x)
    return x, out


def grouped_layout(src: torch.Tensor, u, m: int, dim: int):
    """``group_plan`` for a kernel pruning ``src`` (dense, the op's output strides) by ``m`` along
    ``dim``; ``u``: float uniforms of ``uniform_shape`` (any strides), an int64 seed, or None.
    Returns (plan or None, seeded)."""
    u_shape = uniform_shape(src.shape, m, dim)
    seeded = u is not None and not u.is_floating_point()
    u_stride = contiguous_strides(u_shape) if (u is None or seeded) else u.stride()
    return group_plan(tuple(src.shape), src.stride(), dim % src.dim(), m, tuple(u_shape), tuple(u_stride)), seeded


class Sampled(NamedTuple):
    outer: int
    inner: int
    u_outer: torch.Tensor  # int64 offset of each outer index's first uniform
    u_inner: int
    u_sample: int  # between samples
    samples: int
    seeded: bool
    s_outer: Optional[torch.Tensor]  # the per-slice scales' offset per outer index (None: one scale)
    s_inner: int
    t_outer: Optional[torch.Tensor] = None  # the multiplier's offset per outer index (None: no multiplier)
    t_inner: int = 0


def sampled_layout(src: torch.Tensor, u: torch.Tensor, dim: Optional[int] = None,
                   times: Optional[torch.Tensor] = None) -> Sampled:
    """``flat_plan`` for a per-element kernel over ``src`` with uniforms ``u`` ``(samples, *shape)`` of
    any strides, or int64 seeds ``(samples,)``; with ``dim``, also for its per-slice scales (one per
    index of the other dims, stored contiguously); with ``times``, for a multiplier broadcast to src."""
    seeded = not u.is_floating_point()
    if seeded:
        u_stride, u_sample, samples = contiguous_strides(src.shape), 0, u.numel()
    else:
        u_stride, u_sample, samples = u.stride()[1:], u.stride(0), u.shape[0]
    companions = [tuple(u_stride)]
    if dim is not None:
        companions.append(slice_strides(tuple(src.shape), dim))
    if times is not None:
        companions.append(times.expand(src.shape).stride())
    outer, inner, plans = flat_plan(tuple(src.shape), src.stride(), *companions)
    (u_outer, u_inner), *rest = plans
    s_outer, s_inner = rest.pop(0) if dim is not None else (None, 0)
    t_outer, t_inner = rest.pop(0) if times is not None else (None, 0)
    return Sampled(outer, inner, u_outer, u_inner, u_sample, samples, seeded, s_outer, s_inner, t_outer, t_inner)


def slice_strides(shape: tuple, dim: int) -> tuple:
    """Strides, per element of ``shape``, into its per-slice scales along ``dim`` (keepdim, contiguous)."""
    strides = list(contiguous_strides(scale_shape(shape, dim)))
    strides[dim] = 0
    return tuple(strides)

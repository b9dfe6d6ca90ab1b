"""``torch.ops.nm.*``: the nm custom ops, their fake kernels, and their Inductor decompositions.

The ops are deterministic functions of their inputs: randomness enters as explicit uniforms drawn
with ``torch.rand`` next to them (the functional API and the graph pass both do this), so the
same torch generator state reproduces a run, eager or compiled, and ``opcheck`` can test them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .grouping import uniform_shape
from .luq import luq_math, luq_noise_shape
from .sawb import sawb_math
from .sparsity import greedy_math, mvue_math


def _check_uniforms(x: Tensor, u: Tensor, expected: tuple, op: str) -> None:
    if tuple(u.shape) != tuple(expected):
        raise ValueError(f"nm.{op}: uniforms have shape {tuple(u.shape)}, expected {tuple(expected)} for input {tuple(x.shape)}")


@torch.library.custom_op("nm::mvue", mutates_args=())
def mvue(x: Tensor, u: Tensor, n: int, m: int, dim: int) -> Tensor:
    """MVUE N:M pruning of ``x`` along ``dim`` given per-group uniforms ``u``."""
    _check_uniforms(x, u, uniform_shape(x.shape, m, dim), "mvue")
    return mvue_math(x, u, n, m, dim).contiguous()


@mvue.register_fake
def _(x, u, n, m, dim):
    return x.new_empty(x.shape)


@torch.library.custom_op("nm::greedy", mutates_args=())
def greedy(x: Tensor, n: int, m: int, dim: int) -> Tensor:
    """Greedy N:M pruning (keep the N largest magnitudes, biased) of ``x`` along ``dim``."""
    return greedy_math(x, n, m, dim).contiguous()


@greedy.register_fake
def _(x, n, m, dim):
    return x.new_empty(x.shape)


@torch.library.custom_op("nm::luq", mutates_args=())
def luq(x: Tensor, u: Tensor, bits: int, levels: str) -> Tensor:
    """LUQ of ``x`` with per-element, per-sample uniforms ``u`` (samples averaged)."""
    _check_uniforms(x, u, luq_noise_shape(x.shape, u.shape[0] if u.dim() == x.dim() + 1 else 1), "luq")
    return luq_math(x, u, bits, levels)


@luq.register_fake
def _(x, u, bits, levels):
    return x.new_empty(x.shape)


@torch.library.custom_op("nm::sawb", mutates_args=())
def sawb(x: Tensor, bits: int) -> Tensor:
    """SAWB round-to-nearest quantization of ``x`` (straight-through gradient)."""
    return sawb_math(x, bits)


@sawb.register_fake
def _(x, bits):
    return x.new_empty(x.shape)


def _sawb_setup(ctx, inputs, output):
    pass


def _sawb_backward(ctx, grad):
    return grad, None  # straight-through estimator


sawb.register_autograd(_sawb_backward, setup_context=_sawb_setup)

# Op -> math: what the graph pass inlines for Inductor, and what Inductor itself uses when a user
# calls the ops inside a model compiled by any Inductor-based backend.
DECOMPOSITIONS = {
    torch.ops.nm.mvue.default: mvue_math,
    torch.ops.nm.greedy.default: greedy_math,
    torch.ops.nm.luq.default: luq_math,
    torch.ops.nm.sawb.default: sawb_math,
}


def _register_inductor_decompositions() -> None:
    from torch._inductor.decomposition import register_decomposition

    def contiguous(fn):  # the ops return contiguous tensors (their fake kernels say so)
        return lambda *args: fn(*args).contiguous()

    for op, fn in DECOMPOSITIONS.items():
        register_decomposition(op)(contiguous(fn))


_register_inductor_decompositions()

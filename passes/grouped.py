"""Grouped GEMMs (``torch._grouped_mm``: mixture-of-experts layers) in the joint graph.

A forward ``y = _grouped_mm(x[T, K], w[G, K, N], offs)`` multiplies each expert's rows of x, the tokens routed to
it (sorted by expert; ``offs`` the int32 end of each expert's rows), by its own weight. Its backward is two
grouped GEMMs with the same ``offs``:

- dgrad ``_grouped_mm(gy[T, N], w'[G, N, K], offs)``: each token's gradient reduced over the expert's output
  features, as in a plain dgrad;
- wgrad ``_grouped_mm(a[P, T], b[T, Q], offs) -> [G, P, Q]``: each expert's weight gradient reduced over its own
  tokens, a reduction whose length (the expert's token count) varies from step to step and may be zero.

N:M groups along the wgrad's tokens must not straddle two experts: ``within_experts`` lays each expert's tokens
out from a multiple of M (zeros fill an expert's last partial group), prunes there, and gathers the tokens back.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.fx as fx

from nmcompile.kernels.catalog import Kind
from .analysis import matmul_operands, val
from .compress import apply_fn, compress, gradient_steps, why_unchanged
from .context import RewriteContext, sizes
from .families import ForwardGemm, GemmFamily, register
from .roles import Role

GROUPED_MM = getattr(torch.ops.aten, "_grouped_mm", None)
GROUPED_MM = GROUPED_MM.default if GROUPED_MM is not None else None


def is_grouped_mm(node: fx.Node) -> bool:
    return GROUPED_MM is not None and node.op == "call_function" and node.target is GROUPED_MM


def is_opaque_grouped_mm(node: fx.Node) -> bool:
    """A library's own grouped-GEMM op (transformers' ``grouped_mm_fallback``, its loop of ``mm`` used where torch
    cannot compile ``_grouped_mm``): GEMMs the pass cannot see inside."""
    target = node.target if node.op == "call_function" else None
    name = getattr(target, "__name__", "")
    return (isinstance(target, torch._ops.OpOverload) and target.namespace not in ("aten", "nm")
            and "grouped_mm" in name)


def offsets(node: fx.Node) -> Optional[fx.Node]:
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("offs")


def grouped_role(node: fx.Node, grads: set) -> tuple[Optional[str], str, Optional[int]]:
    """(role, why, which operand carries the gradient) of a backward grouped GEMM."""
    a, b = node.args[0], node.args[1]
    va, vb = val(a), val(b)
    if va is None or vb is None:
        return None, "operands have no fake values", None
    if offsets(node) is None:
        return None, "3D×3D grouped GEMM without offsets (a batched GEMM): not rewritten", None
    if (a in grads) == (b in grads):
        return None, "both operands depend on the incoming gradient" if a in grads else "no operand is a gradient", None
    if va.dim() == 2 and vb.dim() == 3 and a in grads:
        return Role.DGRAD, "2D×3D: each token's gradient times its expert's weight", 0
    if va.dim() == 2 and vb.dim() == 2:
        return Role.WGRAD, "2D×2D: each expert's weight gradient, summed over its tokens", 0 if a in grads else 1
    return None, f"grouped GEMM of a {va.dim()}D and a {vb.dim()}D operand with the gradient in the 3D one", None


def grouped_shape(node: fx.Node) -> tuple:
    """(M, N, K) of the whole grouped GEMM (its FLOPs are 2·M·N·K) and the number of groups."""
    a, b, out = val(node.args[0]), val(node.args[1]), val(node)
    if a is None or b is None or out is None:
        return ("?", "?", "?"), "?"
    if a.dim() == 2 and b.dim() == 2:  # contraction over the tokens of every group
        return (a.shape[0], b.shape[1], a.shape[1]), out.shape[0]
    groups = b.shape[0] if b.dim() == 3 else a.shape[0]
    return (out.shape[-2] if out.dim() == 2 else out.shape[0] * out.shape[1], out.shape[-1], a.shape[-1]), groups


def within_experts(prune: Callable, m: int, dim: int) -> Callable:
    """``prune(x, dim=0)`` applied to ``x`` in N:M groups that start at each expert's first token along ``dim``.

    Rows past ``offs[-1]`` (padding some expert-parallel layouts leave, which the GEMM ignores) go after the last
    expert. Static shapes: the padded layout has rows + G·(M−1) rows, rounded up to M."""

    def apply(x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        t = x.movedim(dim, 0)
        rows, groups = t.shape[0], offs.shape[0]
        ends = offs.to(torch.int64)
        counts = torch.diff(ends, prepend=ends.new_zeros(1))
        padded_counts = (counts + (m - 1)) // m * m
        starts = torch.cat([ends - counts, ends[-1:]])  # and where the rows past offs[-1] begin
        padded_ends = torch.cumsum(padded_counts, 0)
        padded_starts = torch.cat([padded_ends - padded_counts, padded_ends[-1:]])
        i = torch.arange(rows, device=x.device)
        expert = torch.searchsorted(ends, i, right=True)  # G for the rows past offs[-1]
        dest = i - starts[expert] + padded_starts[expert]
        size = (rows + groups * (m - 1) + m - 1) // m * m
        padded = t.new_zeros((size, *t.shape[1:])).index_copy(0, dest, t)
        return prune(padded).index_select(0, dest).movedim(0, dim)

    return apply


def _forward(node: fx.Node) -> ForwardGemm:
    return ForwardGemm(grouped_shape(node)[0], unsupported="forward quantization of grouped (expert) GEMMs is not "
                       "implemented")


def _backward(ctx: RewriteContext, node: fx.Node) -> None:
    """dgrad pruned along the features like any dgrad, wgrad along each expert's own tokens; quantizers per
    tensor."""
    rec = ctx.record(node, "grouped_mm", Role.UNKNOWN)
    with ctx.transaction(rec):
        shape, experts = grouped_shape(node)
        rec.shape = sizes(shape)
        role, why, index = grouped_role(node, ctx.grads)
        if role is None:
            rec.skipped = why
            return
        rec.role, rec.role_why = role, why
        if not ctx.selected(rec):
            return
        grad = node.args[index]
        if role == Role.DGRAD:  # gy[T, N] times the experts' weights: reduced over N
            steps = gradient_steps(ctx, rec, role, val(grad).shape[1], 1, "K (features)")
            new = compress(ctx, grad, node, steps, role) if steps else None
        else:  # reduced over the tokens: dim 1 of a [P, T] left operand, dim 0 of a [T, Q] right one
            dim = 1 if index == 0 else 0
            steps = gradient_steps(ctx, rec, role, val(grad).shape[dim], dim, "K (tokens, per expert)",
                                   experts=experts)
            if steps and steps[0].spec.kind == Kind.PRUNE:  # N:M groups start at each expert's first token
                prune, after = steps[0], apply_fn(steps[1:])
                params = {**prune.params, "dim": 0}
                pruned = within_experts(lambda x: prune.spec.apply(x, **params), prune.params["m"], dim)
                new = compress(ctx, grad, node, steps, role, fn=lambda x, o: after(pruned(x, o)),
                               inputs=[grad, offsets(node)])
            else:
                new = compress(ctx, grad, node, steps, role) if steps else None
        if new is None:
            if not rec.notes:
                rec.skipped = why_unchanged(ctx.config, role)
            return
        node.replace_input_with(grad, new)


FAMILY = register(GemmFamily(
    "grouped", label=lambda node: "grouped_mm", is_forward=is_grouped_mm, is_backward=is_grouped_mm,
    layer_operands=matmul_operands, forward=_forward, backward=_backward,
))

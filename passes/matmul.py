"""The matmul family (``mm``, ``bmm``, ``addmm``): Linear layers and attention's activation GEMMs. A backward
matmul has one gradient operand, compressed along its reduction; the other, when its forward GEMM was
quantized, is rebuilt on the same rounded source."""
from __future__ import annotations

import torch.fx as fx

from .analysis import MATMULS, matmul_operands, val
from .compress import compress, gradient_steps, why_unchanged
from .context import RewriteContext, sizes
from .families import ForwardGemm, GemmFamily, register
from .forward import requantized
from .records import Transform
from .roles import Role


def _is_matmul(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in MATMULS


def _forward(node: fx.Node) -> ForwardGemm:
    left, right = matmul_operands(node)
    lv = val(left)
    return ForwardGemm(matmul_shape(left, right), ((left, -1), (right, -2)), linear=lv is not None and lv.dim() == 2)


def _backward(ctx: RewriteContext, node: fx.Node) -> None:
    rec = ctx.record(node, MATMULS[node.target], Role.UNKNOWN)
    with ctx.transaction(rec):
        left, right = matmul_operands(node)
        rec.shape = sizes(matmul_shape(left, right))
        if val(left) is None or val(right) is None:
            rec.skipped = "operands have no fake values"
            return
        grad_left, grad_right = left in ctx.grads, right in ctx.grads
        if grad_left == grad_right:
            rec.skipped = "both operands depend on the incoming gradient" if grad_left else "no operand is a gradient"
            return
        partner = ctx.partners.get(node.meta.get("seq_nr"))
        role, why = ctx.roles[node]
        if role is None:
            rec.skipped = why
            return
        rec.role, rec.role_why = role, why
        if partner in ctx.dense_layers:
            rec.skipped = ctx.dense_layers[partner]
            return
        other, grad = (right, left) if grad_left else (left, right)
        changes = []  # (old input, new input): made once everything is inserted
        requant = requantized(ctx, other, node, partner)
        if requant is not None:
            changes.append((other, requant[0]))
            rec.transforms.append(Transform(requant[1].op, requant[1].params, role.other))
        if ctx.selected(rec):
            dim = val(grad).dim() - (1 if grad_left else 2)  # the reduction dim of the gradient operand
            steps = gradient_steps(ctx, rec, role, val(grad).shape[dim], dim, role.reduces)
            if steps:
                changes.append((grad, compress(ctx, grad, node, steps, role)))
            elif not rec.transforms and not rec.notes:
                rec.skipped = why_unchanged(ctx.config, role)
        for old, new in changes:
            node.replace_input_with(old, new)


def matmul_shape(left: fx.Node, right: fx.Node) -> tuple:
    a, b = val(left), val(right)
    if a is None or b is None:
        return ("?", "?", "?")
    rows = a.shape[-2] * a.shape[0] if a.dim() == 3 else a.shape[-2]
    return (rows, b.shape[-1], a.shape[-1])


FAMILY = register(GemmFamily(
    "matmul", label=lambda node: MATMULS[node.target], is_forward=_is_matmul, is_backward=_is_matmul,
    layer_operands=lambda node: matmul_operands(node), forward=_forward, backward=_backward,
))

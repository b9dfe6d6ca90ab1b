"""The convolution family. One ``convolution_backward`` computes both backward GEMMs (``output_mask``); a role
that is rewritten gets a ``convolution_backward`` of its own, computing only it, so the other role's operands
stay as they were."""
from __future__ import annotations

import operator

import torch.fx as fx

from .analysis import CONV_BWD, CONV_FWD, val
from .compress import compress, gradient_steps
from .context import RewriteContext, sizes
from .families import ForwardGemm, GemmFamily, register
from .forward import forward_transform, requantized
from .roles import Role

_getitem = operator.getitem


def _forward(node: fx.Node) -> ForwardGemm:
    return ForwardGemm(_forward_shape(node), ((node.args[0], None), (node.args[1], None)))  # per tensor


def _backward(ctx: RewriteContext, node: fx.Node) -> None:
    mask = list(node.args[10])
    getitems = {u.args[1]: u for u in node.users if u.target is _getitem}
    roles = [(index, role) for index, role in ((0, Role.DGRAD), (1, Role.WGRAD)) if mask[index] and index in getitems]
    recs = {index: ctx.record(node, "conv", role) for index, role in roles}
    for index, rec in recs.items():
        rec.role_why = f"convolution_backward's {'input' if index == 0 else 'weight'} gradient"
    with ctx.transaction(*recs.values()):
        grad, x, w = node.args[0], node.args[1], node.args[2]
        partner = ctx.partners.get(node.meta.get("seq_nr"))
        new_x, new_w = ((requantized(ctx, t, node, partner) or (t, None))[0] for t in (x, w))
        replaced = []  # (old getitem, its replacement): made once everything is inserted
        for index, role in roles:
            rec = recs[index]
            rec.shape = sizes(backward_shape(node, role))
            if new_x is not x or new_w is not w:
                rec.transforms.append(forward_transform(ctx.config, role.other))
            g = grad
            if grad in ctx.grads and ctx.selected(rec):
                # dgrad reduces over output channels (dim 1), within each conv group; wgrad over N·H·W: group along W
                dim = 1 if role == Role.DGRAD else val(grad).dim() - 1
                groups = _groups(node)
                group = val(grad).shape[1] // groups if role == Role.DGRAD and groups > 1 else 0
                steps = gradient_steps(ctx, rec, role, val(grad).shape[dim], dim,
                                       "C_out" if role == Role.DGRAD else "W (tokens)", group)
                if steps:
                    g = compress(ctx, grad, node, steps, role)
            if g is grad and new_x is x and new_w is w:
                continue
            one = [i == index for i in range(3)]
            with ctx.graph.inserting_before(node):
                split = ctx.graph.call_function(CONV_BWD, (g, new_x, new_w, *node.args[3:10], one))
                split.meta.update(node.meta)
                item = ctx.graph.call_function(_getitem, (split, index))
                item.meta.update(getitems[index].meta)
            replaced.append((getitems[index], item))
            mask[index] = False
        for old, item in replaced:
            old.replace_all_uses_with(item)
            ctx.graph.erase_node(old)
        if not any(mask[:2]) and not (mask[2] and 2 in getitems):
            for user in list(node.users):
                ctx.graph.erase_node(user)
            ctx.graph.erase_node(node)
        elif mask != list(node.args[10]):
            node.update_arg(10, mask)


def _forward_shape(node: fx.Node) -> tuple:
    out, w = val(node), val(node.args[1])
    if out is None or w is None:
        return ("?", "?", "?")
    tokens = out.shape[0] * out.shape[2:].numel()
    return (tokens, w.shape[0], w.shape[1:].numel())


def _groups(node: fx.Node) -> int:
    """``groups`` of a convolution_backward node (1 for a transposed convolution, whose weight layout differs)."""
    groups, transposed = node.args[9], node.args[7]
    return groups if isinstance(groups, int) and not transposed else 1


def backward_shape(node: fx.Node, role: Role) -> tuple:
    """(M, N, K) of a convolution's backward GEMM, K per conv group: dgrad reduces each input channel's
    gradient over the C_out/groups output channels of its group (× the kernel positions)."""
    grad, x, w = (val(a) for a in node.args[:3])
    if grad is None or x is None or w is None:
        return ("?", "?", "?")
    if role == Role.DGRAD:
        groups = _groups(node)
        return (x.shape[0] * x.shape[2:].numel(), w.shape[1] * groups, w.shape[0] // groups * w.shape[2:].numel())
    return (w.shape[0], w.shape[1:].numel(), grad.shape[0] * grad.shape[2:].numel())


FAMILY = register(GemmFamily(
    "conv", label=lambda node: "conv", is_forward=lambda node: node.target is CONV_FWD,
    is_backward=lambda node: node.target is CONV_BWD, layer_operands=lambda node: (node.args[1],),
    forward=_forward, backward=_backward,
))

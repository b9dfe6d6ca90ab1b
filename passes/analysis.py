"""Read-only analysis of an AOTAutograd joint graph: GEMMs, gradient operands, roles, modules."""
from __future__ import annotations

import re
from typing import Optional

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten

MATMULS = {aten.mm.default: "mm", aten.bmm.default: "bmm", aten.addmm.default: "addmm"}
CONV_FWD = aten.convolution.default
CONV_BWD = aten.convolution_backward.default
# Ops that only change how a tensor is laid out; walked through to find what a GEMM operand is.
LAYOUT_OPS = {
    aten.permute.default, aten.t.default, aten.transpose.int, aten.view.default,
    aten.reshape.default, aten._unsafe_view.default, aten.clone.default, aten.alias.default,
}


def is_tangent(node: fx.Node) -> bool:
    return node.op == "placeholder" and "tangents" in str(node.target)


def tangent_descendants(graph: fx.Graph) -> set:
    """Every node whose value depends on an incoming gradient (a ``tangents_*`` placeholder)."""
    seen: set = set()
    for node in graph.nodes:  # graph order is topological
        if is_tangent(node) or any(arg in seen for arg in node.all_input_nodes):
            seen.add(node)
    return seen


def matmul_operands(node: fx.Node) -> tuple[fx.Node, fx.Node]:
    return (node.args[1], node.args[2]) if node.target is aten.addmm.default else (node.args[0], node.args[1])


def module_path(node: fx.Node) -> str:
    """Qualified module name from the node's (fwd_)nn_module_stack, without the name Dynamo gives the compiled
    module (``L['self']``; ``L['args'][0]`` or ``L['fn']`` under ``module.compile()``; ``G['model']`` for a
    module a compiled function reads from its globals)."""
    stack = node.meta.get("fwd_nn_module_stack") or node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = str(list(stack.values())[-1][0])
    path = re.sub(r"\._modules\['([^']*)'\]", r".\1", path)
    path = re.sub(r"^[LG]\['[^']*'\](\[\d+\])*\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.strip(".")


def val(node) -> Optional[torch.Tensor]:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def size_str(s) -> object:
    return int(s) if isinstance(s, int) or (hasattr(s, "node") and s.node.is_constant()) else str(s)


def layout_chain(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Walk back through layout-only ops; returns (base, chain from base to node, excluding base)."""
    chain = []
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in LAYOUT_OPS:
        chain.append(node)
        node = node.args[0]
    return node, chain[::-1]


CASTS = {aten._to_copy.default, torch.ops.prims.convert_element_type.default}  # autocast's casts of an input


def cast_source(node: fx.Node) -> fx.Node:
    """The tensor ``node`` is a view or a cast of: through layout ops and dtype casts (a weight under autocast)."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in LAYOUT_OPS | CASTS:
        node = node.args[0]
    return node


def layout_from(operand: fx.Node, start: Optional[fx.Node] = None) -> tuple[fx.Node, list[fx.Node]]:
    """``layout_chain(operand)``, or from ``start`` on: a node of that chain, then the layout ops after it."""
    base, chain = layout_chain(operand)
    if start is None or start is base:
        return base, chain
    return start, chain[chain.index(start) + 1:]


def feature_position(operand: fx.Node, start: Optional[fx.Node] = None) -> Optional[int]:
    """Which dim of ``operand`` is the last (feature) dim of the tensor it was laid out from (``start``: of that
    node of its layout chain)."""
    base, chain = layout_from(operand, start)
    base_val = val(base)
    if base_val is None:
        return None
    pos = base_val.dim() - 1
    for node in chain:
        src, out = val(node.args[0]), val(node)
        if src is None or out is None:
            return None
        if node.target is aten.permute.default:
            perm = [d % src.dim() for d in node.args[1]]
            pos = perm.index(pos)
        elif node.target is aten.t.default:
            pos = 1 - pos if src.dim() == 2 else pos
        elif node.target is aten.transpose.int:
            d0, d1 = (d % src.dim() for d in node.args[1:3])
            pos = d1 if pos == d0 else d0 if pos == d1 else pos
        elif node.target in (aten.clone.default, aten.alias.default):
            pass
        else:  # view / reshape
            pos = _view_position(src.shape, out.shape, pos)
            if pos is None:
                return None
    return pos


def last_dim_is_k(operand: fx.Node, k_dim: int, start: Optional[fx.Node] = None) -> bool:
    """Whether the last dim of the tensor ``operand`` is laid out from (``start``: that node of its layout chain)
    lands at the operand's dim ``k_dim``, whole or split (into heads), never merged with other dims: then anything
    constant along that last dim (per-row scales) is constant along ``k_dim``."""
    source, out = val(layout_from(operand, start)[0]), val(operand)
    if source is None or out is None or feature_position(operand, start) != k_dim % out.dim():
        return False
    d, k = source.shape[-1], out.shape[k_dim]
    return isinstance(d, int) and isinstance(k, int) and d % k == 0


def _view_position(src, out, pos: int) -> Optional[int]:
    """Where dim ``pos`` of ``src`` lands in the view ``out``. Understood: views that leave the
    dims up to ``pos`` alone, and views that split (e.g. into heads) or merge the last dim, whose
    innermost part stays last."""
    same = lambda a, b: statically_known_true(a == b)  # noqa: E731
    if pos < len(src) - 1:
        if len(out) > pos and all(same(src[i], out[i]) for i in range(pos + 1)):
            return pos
        return None
    s_last, o_last = src[-1], out[-1]
    if same(s_last, o_last) or same(s_last % o_last, 0) or same(o_last % s_last, 0):
        return len(out) - 1
    return None


def is_fused_attention_backward(node: fx.Node) -> bool:
    """SDPA backward kernels (flash / efficient / cuDNN / CPU flash): GEMMs the pass cannot see."""
    name = getattr(node.target, "__name__", str(node.target))
    return "backward" in name and (
        "scaled_dot_product" in name or name.startswith(("_flash_attention", "_efficient_attention"))
    )


def matmul_role(node: fx.Node, grad_is_left: bool, forward_partner: Optional[fx.Node]) -> tuple[Optional[str], str]:
    """Which side of its forward GEMM a backward GEMM is: "dgrad" (reduces over the forward output's features)
    or "wgrad" (over its rows/tokens). What it is for (``roles.GraphRoles``) also needs where its output goes.

    First by sizes against the forward GEMM with the same ``seq_nr``; where those are equal, by
    following the gradient operand's layout back to the tensor it came from.
    """
    left, right = matmul_operands(node)
    k = val(left).shape[-1]
    fwd = val(forward_partner) if forward_partner is not None else None
    if fwd is not None and fwd.dim() >= 2:
        rows, cols = fwd.shape[-2], fwd.shape[-1]
        if statically_known_true(k == cols) and not statically_known_true(k == rows):
            return "dgrad", "by sizes"
        if statically_known_true(k == rows) and not statically_known_true(k == cols):
            return "wgrad", "by sizes"
    operand = left if grad_is_left else right
    pos = feature_position(operand)
    nd = val(operand).dim()
    contracted = nd - 1 if grad_is_left else nd - 2
    other = nd - 2 if grad_is_left else nd - 1
    if pos == contracted:
        return "dgrad", "by layout"
    if pos == other:
        return "wgrad", "by layout"
    return None, "the gradient operand's layout could not be traced to its source"


def forward_partners(graph: fx.Graph) -> dict:
    """seq_nr -> forward GEMM node (the op whose backward the backward GEMMs implement)."""
    out = {}
    for node in graph.nodes:
        if node.op == "call_function" and (node.target in MATMULS or node.target is CONV_FWD):
            if node.meta.get("partitioner_tag") != "is_backward" and "seq_nr" in node.meta:
                out.setdefault(node.meta["seq_nr"], node)
    return out

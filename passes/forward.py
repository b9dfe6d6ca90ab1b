"""Forward quantization (``fwd_quant``): each forward GEMM's operands rounded at their source, and the same
rounded operands given to the backward GEMMs that differentiate it. Every family's forward GEMM passes through
here; the family says what its operands are (``families.ForwardGemm``)."""
from __future__ import annotations

from typing import Mapping, Optional

import torch.fx as fx

from nmcompile.kernels.catalog import OPS
from .analysis import cast_source, is_tangent, last_dim_is_k, layout_chain, layout_from, module_path, val
from .compress import apply_fn
from .config import NMConfig
from .context import RewriteContext, sizes
from .families import GemmFamily
from .records import GemmRecord, NodeInfo, Transform
from .roles import Role
from .speed import dense_is_faster


def forward_transform(cfg: NMConfig, where: str, dim: Optional[int] = None) -> Transform:
    spec = OPS[cfg.fwd_quant]
    rows = {"dim": dim} if dim is not None else {}
    return Transform(spec.name, {**cfg.params_for(spec), **rows}, where)


def quantize_forward(ctx: RewriteContext, gemms: Mapping[fx.Node, GemmFamily]) -> None:
    """Records every forward GEMM of ``gemms`` (in graph order, each with its family) and, with ``fwd_quant``
    set, quantizes its operands."""
    cfg = ctx.config
    kept = _kept(ctx, gemms)
    for node, family in gemms.items():
        rec = ctx.record(node, family.label(node), Role.FWD)
        with ctx.transaction(rec):
            gemm = family.forward(node)
            rec.shape = sizes(gemm.shape)
            if cfg.fwd_quant is None:
                continue
            if node in kept:
                rec.skipped = kept[node]
                continue
            if gemm.unsupported:
                rec.skipped = f"{cfg.fwd_quant} {gemm.unsupported}"
                continue
            if not ctx.selected(rec):
                continue
            if not cfg.fwd_act_gemms and not any(ctx.roles.is_parameter(op) for op, _ in gemm.operands):
                rec.skipped = ("a GEMM of two activations, such as attention's q·kᵀ and p·v, kept in high precision "
                               "(fwd_act_gemms=False)")
                continue
            if cfg.dense_if_faster and gemm.linear:
                left = val(gemm.operands[0][0])
                why = dense_is_faster(*gemm.shape, left.dtype, left.device, cfg)
                if why is not None:
                    rec.skipped = ctx.dense_layers[node] = why
                    continue
            new = [_quantize_source(ctx, operand, node, *_source(cfg, operand, k, rec))
                   for operand, k in gemm.operands]  # insertions only
            for (operand, _), (quantized, _) in zip(gemm.operands, new):  # then the change
                node.replace_input_with(operand, quantized)
            ctx.quantized_gemms.add(node)
            rows = [t for _, t in new if "dim" in t.params]
            rec.transforms.append(rows[0] if len(rows) == len(new) else forward_transform(cfg, "W,X"))


def requantized(ctx: RewriteContext, operand: fx.Node, gemm: fx.Node, partner: Optional[fx.Node]) -> Optional[tuple]:
    """(the backward GEMM's non-gradient operand rebuilt on its quantized source, the Transform), when
    the forward GEMM it differentiates was quantized (a source shared with a high-precision GEMM is not)."""
    if partner is not None and partner not in ctx.quantized_gemms:
        return None
    base, chain = layout_chain(operand)
    for i, source in reversed(list(enumerate((base, *chain)))):  # where along its layout the forward rounded it
        if source in ctx.quantized:
            node, quantize = ctx.quantized[source]
            return replay(ctx, chain[i:], node, before=gemm), quantize
    return None


def replay(ctx: RewriteContext, chain: list, new_base: fx.Node, before: fx.Node) -> fx.Node:
    """The layout ops of ``chain`` copied onto ``new_base``, before ``before``."""
    node = new_base
    with ctx.graph.inserting_before(before):
        for link in chain:
            prev = node
            node = ctx.graph.node_copy(link, lambda n, src=link.args[0], p=prev: p if n is src else n)
    return node


def _source(cfg: NMConfig, operand: fx.Node, k_dim: Optional[int], rec: GemmRecord) -> tuple:
    """With ``fwd_scales="row"``: (the tensor along ``operand``'s layout to quantize, the dim of it that holds
    the forward GEMM's K, along which its per-row scales are shared); (None, None) for one scale per tensor of
    the tensor it is laid out from (also where the family gives no K, ``k_dim`` None). The first tensor along the
    layout whose last dim lands whole at K: the source itself, or a later copy, such as attention's output once
    its heads are merged back into features."""
    if cfg.fwd_scales != "row" or k_dim is None:
        return None, None
    base, chain = layout_chain(operand)
    for start in (base, *chain):
        if last_dim_is_k(operand, k_dim, start):
            return start, val(start).dim() - 1
    note = (f"{operand.name}: its K is not the last dim of any tensor along its layout (or merges it with others), "
            "so one scale per tensor")
    if note not in rec.notes:
        rec.notes.append(note)
    return None, None


def _quantize_source(ctx: RewriteContext, operand: fx.Node, gemm: fx.Node, source: Optional[fx.Node],
                     dim: Optional[int]) -> tuple:
    """Quantize ``source``, a tensor along ``operand``'s layout (None: the one it is laid out from), with per-row
    scales along ``dim`` (None: one per tensor); returns the operand rebuilt on it and the Transform. A tensor is
    quantized once, for its first GEMM."""
    base, chain = layout_from(operand, source)
    if base not in ctx.quantized:
        anchor = base.next
        while anchor.op == "placeholder":  # keep placeholders first
            anchor = anchor.next
        quantize = forward_transform(ctx.config, "W,X", dim)
        info = NodeInfo((quantize.op,), gemm.name, module_path(gemm), Role.FWD, bits=quantize.params["bits"])
        ctx.quantized[base] = ctx.splice(anchor, apply_fn([quantize]), [base], serves=gemm, info=info), quantize
    node, quantize = ctx.quantized[base]
    return replay(ctx, chain, node, before=gemm), quantize


def _kept(ctx: RewriteContext, gemms: Mapping[fx.Node, GemmFamily]) -> dict:
    """The forward GEMMs ``keep_first_last`` keeps, each with the reason its record gives: those whose
    weight is the model's first or last layer, or, with no model found, the graph's own first and last."""
    if not ctx.config.keep_first_last or not gemms:
        return {}
    if ctx.ends is None:
        gemms = list(gemms)
        which = {gemms[0]: "first", gemms[-1]: "last" if gemms[-1] is not gemms[0] else "first and last"}
        return {node: f"{w} forward GEMM of graph {ctx.graph_index} kept in high precision (keep_first_last=True; "
                      "its parameters belong to no module running when it compiled, so each graph keeps its own)"
                for node, w in which.items()}
    primals = (n for n in ctx.graph.nodes if n.op == "placeholder" and not is_tangent(n))
    inputs = {n: i for i, n in enumerate(primals)}  # the joint graph's primals are the Dynamo graph's inputs
    kept = {}
    for node, family in gemms.items():
        # through autocast's cast too: under autocast the kept layer runs in bf16, as Inductor would run it
        roles = {r for op in family.layer_operands(node)
                 for r in ctx.ends.roles(inputs.get(cast_source(op), -1))}
        if roles:
            which = [w for w in ("first", "last") if w in roles]
            names = " and ".join(dict.fromkeys(getattr(ctx.ends, w) for w in which))
            kept[node] = (f"{' and '.join(which)} layer of the model ({ctx.ends.model}.{names}) kept in high "
                          "precision (keep_first_last=True)")
    return kept

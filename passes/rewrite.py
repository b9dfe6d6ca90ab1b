"""The joint-graph rewrite: compress neural gradients before backward GEMMs, quantize forward
GEMM operands, and record every decision (docs/architecture.md, "The pass").

Each GEMM family (passes.matmul, passes.conv, passes.grouped) registers the targets it rewrites; forward
quantization (passes.forward) sees every family's forward GEMM. ``UNREWRITTEN`` lists the GEMM targets the pass
understands but cannot see inside."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch.fx as fx

from . import conv, grouped, matmul  # noqa: F401  (each registers its family)
from .analysis import forward_partners, is_fused_attention_backward, is_tangent, module_path, tangent_descendants, val
from .config import NMConfig
from .context import RewriteContext
from .ends import ModelEnds
from .families import backward_family, forward_family
from .forward import quantize_forward
from .grouped import is_opaque_grouped_mm
from .lowering import lower_gemms
from .records import GemmRecord
from .roles import GraphRoles, Role
from .seeds import merge_seed_draws


@dataclasses.dataclass(frozen=True)
class Unrewritten:
    """A GEMM target the pass understands but leaves alone: its record says why."""

    op: str  # the record's op
    matches: Callable[[fx.Node], bool]
    reason: Callable[[fx.Node], str]

    def record(self, node: fx.Node, graph_index: int) -> GemmRecord:
        dtype = str(getattr(val(node.args[0]), "dtype", "?")).replace("torch.", "")
        return GemmRecord(graph_index, node.name, self.op, Role.UNKNOWN, module_path(node), ("?",) * 3, dtype,
                          skipped=self.reason(node))


UNREWRITTEN = (
    Unrewritten("sdpa", is_fused_attention_backward, lambda node: (
        "fused attention kernel: its GEMMs are not visible to the pass (run attention under "
        "torch.nn.attention.sdpa_kernel(SDPBackend.MATH) to rewrite them)")),
    Unrewritten("grouped_mm", is_opaque_grouped_mm, lambda node: (
        f"{node.target.namespace}.{node.target.__name__}: a library's own grouped-GEMM op, its GEMMs not visible to "
        "the pass (transformers uses it where torch cannot compile torch._grouped_mm, e.g. in fp32: train in bf16 "
        "to have the experts' GEMMs rewritten)")),
)


def rewrite_joint_graph(graph: fx.Graph, config: NMConfig, *, decompose: bool, graph_index: int = 0,
                        ends: Optional[ModelEnds] = None, parameters: Optional[frozenset] = None) -> list:
    """Rewrite ``graph`` in place; returns one GemmRecord per GEMM (forward and backward).

    Graphs without tangents (inference) are left untouched and give no records. ``ends``: where the model's
    first and last layer are among the graph's inputs (``passes.ends``), for ``keep_first_last``.
    ``parameters``: which graph inputs are parameters (``roles.parameter_inputs``), to tell update GEMMs;
    None counts every input's gradient as a parameter's.
    """
    if not any(is_tangent(n) for n in graph.nodes):
        return []
    grads = tangent_descendants(graph)
    partners = forward_partners(graph)
    nodes = [n for n in graph.nodes if n.op == "call_function"]
    fwd = {n: family for n in nodes if (family := forward_family(n)) is not None
           and n not in grads and n.meta.get("partitioner_tag") != "is_backward"}  # each forward GEMM's family
    if decompose:
        from torch._inductor.decomposition import select_decomp_table

        decompositions = select_decomp_table()
    else:
        decompositions = {}
    ctx = RewriteContext(graph, config, graph_index, ends,
                         GraphRoles(graph, parameters, grads, partners),  # reads the graph as it is before the rewrite
                         partners, frozenset(grads), decompositions)
    quantize_forward(ctx, fwd)
    for node in nodes:
        if node in fwd:
            continue
        family = backward_family(node)
        if family is not None:
            family.backward(ctx, node)
            continue
        unrewritten = next((u for u in UNREWRITTEN if u.matches(node)), None)
        if unrewritten is not None:
            ctx.records.append(unrewritten.record(node, graph_index))
    lower_gemms(graph, ctx.records, config, decompositions)
    if decompose:  # for Inductor: one seed buffer, not a kernel per draw
        merge_seed_draws(graph)
    graph.eliminate_dead_code()
    graph.lint()
    return ctx.records

"""What the backward keeps for each backward GEMM, with its bytes, and which forward GEMMs it recomputes.

Read from the graphs AOTAutograd's partitioner made (``nmcompile.capture``): the backward graph's inputs other
than its tangents are the tensors the forward saved for it. For a backward GEMM, the tensors it needs are those its
operands are computed from without the incoming gradient: walking back from the GEMM over the nodes that do not
depend on a tangent reaches saved tensors. Saved tensors no backward GEMM reaches serve the elementwise backward
(GELU, LayerNorm, softmax): the report lists them apart, with the forward GEMMs the backward runs again to recompute
what those need (the ``recompute`` option: the int8 codes kept, the GEMM's output recomputed from them).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.fx as fx

from nmcompile.passes.analysis import is_tangent, module_path
from nmcompile.passes.records import NodeInfo
from nmcompile.passes.roles import Role

_LOW_PRECISION_GEMMS = {torch.ops.aten._int_mm.default, torch.ops.nm.fp8_mm.default, torch.ops.nm.int8_mm.default,
                        torch.ops.nm.sparse24_mm.default}


@dataclasses.dataclass(frozen=True)
class Kept:
    """One tensor the forward saves for the backward."""

    name: str  # the backward graph's input
    shape: tuple
    dtype: str
    bytes: int
    module: str  # the module whose forward produced it
    what: str  # the op that produced it: an nm op ("absmax_int8" codes and scales) or an aten op ("addmm")

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "shape": list(self.shape)}


def _nbytes(value) -> int:
    """Its bytes; 0 for a size only known at run time (dynamic shapes), which the shape then shows."""
    if not isinstance(value, torch.Tensor):
        return 0
    n = value.numel() * value.element_size()
    return n if isinstance(n, int) else 0


def _shape(value: torch.Tensor) -> tuple:
    return tuple(s if isinstance(s, int) else str(s) for s in value.shape)


def saved_tensors(forward: fx.GraphModule, backward: fx.GraphModule) -> dict:
    """The backward's saved-tensor inputs, by name -> Kept (described from the forward node that made them)."""
    saved = [n for n in backward.graph.nodes if n.op == "placeholder" and not is_tangent(n)]
    output = next(n for n in forward.graph.nodes if n.op == "output")
    outs = list(torch.utils._pytree.tree_leaves(output.args[0]))
    producers = outs[len(outs) - len(saved):] if saved else []  # the forward returns its outputs, then what it saves
    kept = {}
    for placeholder, node in zip(saved, producers):
        value = placeholder.meta.get("val")
        if not isinstance(value, torch.Tensor):
            continue  # a saved size (SymInt)
        info = NodeInfo.read(node) if isinstance(node, fx.Node) else None
        source = node if isinstance(node, fx.Node) else placeholder
        what = info.label if info is not None else "input" if source.op == "placeholder" else getattr(
            source.target, "__name__", str(source.target))
        kept[placeholder.name] = Kept(placeholder.name, _shape(value), str(value.dtype).replace("torch.", ""),
                                      _nbytes(value), info.module if info is not None else module_path(source),
                                      what.split(".")[0] if info is None else what)
    return kept


def _tangent_dependent(graph: fx.Graph) -> set:
    dependent = set()
    for node in graph.nodes:
        if is_tangent(node) or any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
    return dependent


def needs(gemm: fx.Node, dependent: set) -> list:
    """The saved-tensor placeholders ``gemm``'s non-gradient side is made from."""
    own = NodeInfo.read(gemm)  # a lowered GEMM is several nodes, which mix both sides: walk through them all
    seen, todo, placeholders = set(), [gemm], []
    while todo:
        for node in todo.pop().all_input_nodes:
            if node in seen or (node in dependent and (own is None or NodeInfo.read(node) != own)):
                continue
            seen.add(node)
            if node.op == "placeholder":
                placeholders.append(node)
            else:
                todo.append(node)
    return placeholders


def recomputed(backward: fx.GraphModule) -> list:
    """The modules whose forward GEMM runs again in the backward (the partitioner recomputes it from saved codes),
    and "<module> (attention)" for a fused attention forward recomputed on their outputs."""
    modules = []
    for node in backward.graph.nodes:
        info = NodeInfo.read(node)
        target = node.target
        if getattr(target, "__name__", "") == "run_with_rng_state":  # a random op replayed with its saved RNG state
            target = node.args[1]
        name = getattr(target, "__name__", "")
        if info is not None and info.role == Role.FWD and node.target in _LOW_PRECISION_GEMMS:
            what = info.module
        elif node.op == "call_function" and "scaled_dot_product" in name and "backward" not in name:
            where = module_path(node) or next((module_path(a) for a in node.all_input_nodes if module_path(a)), "")
            what = f"{where} (attention)"
        else:
            continue
        if what not in modules:
            modules.append(what)
    return modules


def annotate(records: list, index: int, forward: Optional[fx.GraphModule], backward: Optional[fx.GraphModule]) -> list:
    """Fill ``kept`` of graph ``index``'s backward GEMM records; returns the saved tensors no backward GEMM needs
    (Kept), which serve the elementwise backward."""
    if forward is None or backward is None:
        return []
    saved = saved_tensors(forward, backward)
    dependent = _tangent_dependent(backward.graph)
    by_node = {r.node: r for r in records if r.graph == index and r.role != Role.FWD}
    used = set()
    for node in backward.graph.nodes:
        rec = by_node.get(node.name)
        if rec is None:
            continue
        placeholders = needs(node, dependent)
        rec.kept = [saved[p.name].as_dict() for p in placeholders if p.name in saved]
        used.update(p.name for p in placeholders)
    return [k for name, k in saved.items() if name not in used]

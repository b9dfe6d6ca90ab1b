"""The FX graphs as a Model Explorer graph collection, and its node-data overlays."""
from __future__ import annotations

import pathlib
from typing import Optional

import torch
import torch._inductor.decomposition  # noqa: F401  (defines prims.fma, which the captured graphs use)
import torch.fx as fx

from nmcompile.passes.analysis import module_path
from nmcompile.passes.records import NodeInfo

from .nodes import NM_COLORS, _shape_str, _target_name, nm_attrs

# -- Model Explorer ----------------------------------------------------------------------------
def _namespace(node: fx.Node) -> str:
    if node.op == "placeholder":
        return "inputs"
    if node.op == "output":
        return "outputs"
    return module_path(node).replace(".", "/")


def model_explorer_graph(gm: fx.GraphModule, graph_id: str, records: Optional[dict] = None) -> dict:
    """One Model Explorer ``Graph``: node id = FX node name, namespace = module path ('/'-joined),
    edges from the FX inputs, the output shape as ``tensor_shape``, nm nodes styled and annotated."""
    records = records or {}
    nodes = []
    for node in gm.graph.nodes:
        attrs = [{"key": "target", "value": _target_name(node)}]
        info = nm_attrs(node)
        style = None
        if info is not None:
            attrs += [{"key": f"nm.{k}", "value": str(v)} for k, v in info.items()]
            attrs.append({"key": "feeds", "value": {"type": "node_ids", "nodeIds": [u.name for u in node.users]}})
            style = {
                "backgroundColor": NM_COLORS.get(info["op"], "#ffa94d"),
                "borderColor": "#e8590c",
                "hoveredBorderColor": "#d9480f",
            }
        elif NodeInfo.read(node) is not None:
            attrs.append({"key": "nm.for", "value": NodeInfo.read(node).gemm})
            style = {"backgroundColor": NM_COLORS["rand"], "borderColor": "#868e96", "hoveredBorderColor": "#495057"}
        rec = records.get(node.name)
        if rec is not None:
            attrs += [
                {"key": "gemm.role", "value": rec.role},
                {"key": "gemm.shape", "value": "x".join(map(str, rec.shape))},
                {"key": "gemm.transforms", "value": ", ".join(rec.transforms) or f"skipped: {rec.skipped}"},
                {"key": "gemm.kernel", "value": rec.kernel + (f" ({rec.kernel_note})" if rec.kernel_note else "")},
            ]
        if node.meta.get("stack_trace"):
            attrs.append({"key": "stack_trace", "value": node.meta["stack_trace"].strip()})
        edges = [
            {"sourceNodeId": src.name, "sourceNodeOutputId": "0", "targetNodeInputId": str(i)}
            for i, src in enumerate(node.all_input_nodes)
        ]
        entry = {
            "id": node.name,
            "label": _target_name(node) if node.op == "call_function" else node.op,
            "namespace": _namespace(node),
            "subgraphIds": [],
            "attrs": attrs,
            "incomingEdges": edges,
            "outputsMetadata": [{"id": "0", "attrs": [{"key": "tensor_shape", "value": _shape_str(node)}]}],
        }
        if style:
            entry["style"] = style
        nodes.append(entry)
    return {"id": graph_id, "nodes": nodes}


OVERLAYS = ("density", "bits")


def overlay_paths(collection: pathlib.Path) -> dict:
    """Where the overlays of a collection written to ``collection`` go: ``me.json`` ->
    ``me.density.json``, ``me.bits.json`` (``export`` writes them, ``view`` loads them)."""
    base = collection.with_suffix("") if collection.suffix == ".json" else collection
    return {name: base.with_name(f"{base.name}.{name}.json") for name in OVERLAYS}


def node_data(graphs: dict) -> tuple[dict, dict]:
    """Node-data overlays keyed by graph id: ``density`` (fraction kept by N:M pruning, on the nm
    nodes and on the GEMMs they feed) and ``bits`` (LUQ / SAWB bit width)."""
    density, bits = {}, {}
    for graph_id, gm in graphs.items():
        d, q = {}, {}
        for node in gm.graph.nodes:
            info = nm_attrs(node)
            if info is None:
                continue
            if "density" in info:
                d[node.name] = {"value": info["density"]}
                for user in node.users:
                    d[user.name] = {"value": info["density"]}
            if "bits" in info:
                q[node.name] = {"value": info["bits"]}
        density[graph_id] = {
            "results": d,
            "gradient": [{"stop": 0, "bgColor": "#e03131"}, {"stop": 1, "bgColor": "#f8f9fa"}],
        }
        bits[graph_id] = {
            "results": q,
            "thresholds": [
                {"value": 4, "bgColor": "#7048e8"},
                {"value": 8, "bgColor": "#b197fc"},
                {"value": 32, "bgColor": "#f8f9fa"},
            ],
        }
    return density, bits



"""The FX graph as Graphviz DOT: nm nodes filled, GEMMs bold, nodes clustered by module."""
from __future__ import annotations

from typing import Optional

import torch
import torch._inductor.decomposition  # noqa: F401  (defines prims.fma, which the captured graphs use)
import torch.fx as fx

from nmcompile.passes.analysis import module_path
from nmcompile.passes.records import NodeInfo

from .nodes import NM_COLORS, _shape_str, _target_name, nm_attrs

# -- Graphviz DOT ------------------------------------------------------------------------------
def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(gm: fx.GraphModule, graph_id: str, records: Optional[dict] = None) -> str:
    """A Graphviz digraph; nm nodes filled by op (MVUE orange, greedy yellow, LUQ purple, SAWB blue,
    their uniforms grey), GEMMs bold, clustered by module."""
    records = records or {}
    lines = [
        f"digraph {_dot_quote(graph_id)} {{",
        "  rankdir=TB;",
        '  node [shape=box, fontname="Helvetica", fontsize=10];',
    ]
    clusters: dict = {}
    for node in gm.graph.nodes:
        label = f"{node.name}\n{_target_name(node)}"
        shape = _shape_str(node)
        if shape:
            label += f"\n{shape}"
        attrs = {}
        info = nm_attrs(node)
        if info is not None:
            label += f"\n{info['op']} {info['pattern']} {info['role']} {info['module']}"
            attrs.update(style="filled", fillcolor=NM_COLORS.get(info["op"], "#ffa94d"))
        elif NodeInfo.read(node) is not None:
            attrs.update(style="filled", fillcolor=NM_COLORS["rand"])
        rec = records.get(node.name)
        if rec is not None:
            label += f"\n{rec.role} {'x'.join(map(str, rec.shape))}" + (
                f"\n{rec.kernel}" if rec.kernel.native else ""
            )
            attrs["penwidth"] = "2.5"
        attrs["label"] = label
        body = ", ".join(f"{k}={_dot_quote(str(v))}" for k, v in attrs.items())
        clusters.setdefault(module_path(node) if node.op == "call_function" else "", []).append(
            f"{_dot_quote(node.name)} [{body}];"
        )
    for i, (module, entries) in enumerate(clusters.items()):
        if module:
            lines.append(f"  subgraph cluster_{i} {{ label={_dot_quote(module)}; style=dashed;")
            lines += [f"    {e}" for e in entries]
            lines.append("  }")
        else:
            lines += [f"  {e}" for e in entries]
    for node in gm.graph.nodes:
        for src in node.all_input_nodes:
            lines.append(f"  {_dot_quote(src.name)} -> {_dot_quote(node.name)};")
    lines.append("}")
    return "\n".join(lines) + "\n"

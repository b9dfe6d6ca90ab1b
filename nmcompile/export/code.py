"""The rewritten graph as readable Python code, with every node the nm pass inserted marked (``nmcompile inspect``
prints it)."""
from __future__ import annotations

import re

from nmcompile.kernels.catalog import Stage, ops_of
from nmcompile.passes.records import NodeInfo

from .nodes import is_inserted, nm_attrs


def graph_code(gm, annotate: bool = True) -> tuple[str, set]:
    """The graph's readable code; every line defining an inserted node is marked, and each nm op is
    preceded by a ``# <-- nm: <op> <pattern> <role> <module>`` line. Returns (code, 1-based marked lines)."""
    gradient_ops = {spec.name for spec in ops_of(stage=Stage.GRADIENT)}
    inserted = {}
    for node in gm.graph.nodes:
        if is_inserted(node):
            info = nm_attrs(node)
            if info is not None:
                inserted[node.name] = f"nm: {info['op']} {info['pattern']} {info['role']} {info['module'] or '<top>'}"
            else:
                meta = NodeInfo.read(node)
                if meta is None or meta.op == ("seeds",) or meta.op[0] in gradient_ops:
                    inserted[node.name] = f"nm: uniforms for {meta.gemm if meta else '?'}"
                else:  # lowering="native": float8 codes and the FP8 / 2:4 GEMMs
                    what = meta.kernel or meta.label
                    inserted[node.name] = f"nm: {what} {meta.role or 'fwd'} {meta.module or '<top>'}"
    code = gm.print_readable(print_output=False, include_stride=False, include_device=False)
    lines, marked = [], set()
    pattern = re.compile(r'^\s*(\w+)(?:\s*:\s*"[^"]*")?\s*=')
    for line in code.splitlines():
        m = pattern.match(line)
        if m and m.group(1) in inserted:
            if annotate and not inserted[m.group(1)].startswith("nm: uniforms"):
                indent = line[: len(line) - len(line.lstrip())]
                lines.append(f"{indent}# <-- {inserted[m.group(1)]}")
                marked.add(len(lines))
            marked.add(len(lines) + 1)
        lines.append(line)
    return "\n".join(lines), marked

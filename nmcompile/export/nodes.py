"""What an inserted node is: the nm op behind a node, its attributes, and how it is shown."""
from __future__ import annotations

from typing import Optional

import torch
import torch._inductor.decomposition  # noqa: F401  (defines prims.fma, which the captured graphs use)
import torch.fx as fx

from nmcompile.passes.analysis import module_path
from nmcompile.passes.records import NodeInfo

aten = torch.ops.aten

NM_OPS = {"mvue", "greedy", "luq", "sawb"}
NM_COLORS = {"mvue": "#ffa94d", "greedy": "#ffd43b", "luq": "#b197fc", "sawb": "#74c0fc", "rand": "#dee2e6"}


# -- what an inserted node is ------------------------------------------------------------------
def nm_op_name(node: fx.Node) -> Optional[str]:
    """``mvue``/``greedy``/``luq``/``sawb`` for a ``torch.ops.nm.*`` call, else None."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    if node.target.namespace != "nm" or node.target._opname not in NM_OPS:
        return None  # e.g. nm.seeds, the seed buffer of a graph lowered for Inductor
    return node.target._opname


def nm_attrs(node: fx.Node) -> Optional[dict]:
    """What an nm op node does: op, pattern, n/m/dim or bits/levels, role, module, the GEMM it serves,
    and ``density`` (fraction kept) for the pruning ops. None for other nodes."""
    op = nm_op_name(node)
    if op is None:
        return None
    info = NodeInfo.read(node)
    out = {"op": op, "role": (info.role if info else "") or ("fwd" if op == "sawb" else "?"),
           "module": info.module if info else module_path(node), "gemm": info.gemm if info else ""}
    args = list(node.args)
    if op == "mvue":
        n, m, dim = args[2:5]
    elif op == "greedy":
        n, m, dim = args[1:4]
    if op in ("mvue", "greedy"):
        out.update(n=int(n), m=int(m), dim=int(dim), pattern=f"{n}:{m}", density=int(n) / int(m))
    elif op == "luq":
        out.update(bits=int(args[2]), levels=str(args[3]), pattern=f"luq{args[2]}")
    else:
        out.update(bits=int(args[1]), pattern=f"sawb{args[1]}")
    return out


def is_inserted(node: fx.Node) -> bool:
    """Inserted by the nm pass (the nm ops and the uniforms drawn for them)."""
    return NodeInfo.read(node) is not None or nm_op_name(node) is not None


def _target_name(node: fx.Node) -> str:
    if node.op != "call_function":
        return node.op
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}" + (
            "" if target._overloadname == "default" else f".{target._overloadname}"
        )
    return getattr(target, "__name__", str(target))


def _tensor(node) -> Optional[torch.Tensor]:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _shape_str(node: fx.Node) -> str:
    v = node.meta.get("val")
    if isinstance(v, torch.Tensor):
        return f"{str(v.dtype).replace('torch.', '')}[{', '.join(str(s) for s in v.shape)}]"
    if isinstance(v, (tuple, list)):
        return (
            "("
            + ", ".join(f"[{', '.join(map(str, t.shape))}]" if isinstance(t, torch.Tensor) else "None" for t in v)
            + ")"
        )
    return ""



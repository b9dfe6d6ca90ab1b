"""What an inserted node is: the nm op behind a node, its attributes, and how it is shown."""
from __future__ import annotations

from typing import Optional

import torch
import torch._inductor.decomposition  # noqa: F401  (defines prims.fma, which the captured graphs use)
import torch.fx as fx

from nmcompile.kernels.catalog import OPS, SEEDS_COLOR, OpSpec, Stage, density, spec_of
from nmcompile.passes.analysis import module_path
from nmcompile.passes.records import NodeInfo
from nmcompile.passes.roles import Role

aten = torch.ops.aten

NM_OPS = set(OPS)
NM_COLORS = {**{name: spec.color for name, spec in OPS.items()}, "rand": SEEDS_COLOR}


# -- what an inserted node is ------------------------------------------------------------------
def nm_spec(node: fx.Node) -> Optional[OpSpec]:
    """The description of the nm op a node calls (``kernels.catalog``), else None (other nodes, and
    nm.seeds, the seed buffer of a graph lowered for Inductor)."""
    return spec_of(node.target) if node.op == "call_function" else None


def nm_op_name(node: fx.Node) -> Optional[str]:
    """The catalog name (``mvue``, ``luq``, ...) of the nm op a node calls, else None."""
    spec = nm_spec(node)
    return spec.name if spec is not None else None


def nm_attrs(node: fx.Node) -> Optional[dict]:
    """What an nm op node does: op, pattern (its short label), its parameters (n/m/dim, bits/levels,
    ...), role, module, the GEMM it serves, and ``density`` (fraction kept) for the pruning ops.
    None for other nodes."""
    spec = nm_spec(node)
    if spec is None:
        return None
    info = NodeInfo.read(node)
    params = {k: v for k, v in zip(spec.args, node.args[1:]) if k != "u"}
    role = (info.role if info else "") or (Role.FWD if spec.stage == Stage.FORWARD else Role.UNKNOWN)
    out = {"op": spec.name, "role": str(role),  # a plain str: ONNX attributes and JSON take it
           "module": info.module if info else module_path(node), "gemm": info.gemm if info else ""}
    out.update(params)
    out["pattern"] = spec.label(params)
    if density(spec, params) is not None:
        out["density"] = density(spec, params)
    return out


def is_inserted(node: fx.Node) -> bool:
    """Inserted by the nm pass (the nm ops and the uniforms drawn for them)."""
    return NodeInfo.read(node) is not None or nm_spec(node) is not None


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



"""The neural gradient's compression before a backward GEMM, shared by every GEMM family: which Transforms
apply to a gradient operand, why none do, and their splice into the graph."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch.fx as fx

from nmcompile.kernels.catalog import OPS
from nmcompile.kernels.hadamard import check_block, rotated
from .analysis import module_path
from .config import NMConfig
from .context import RewriteContext
from .records import GemmRecord, NodeInfo, Transform
from .roles import Role


# The ops are opaque calls, each drawing its seeds from torch's generator. Inductor calls them as extern kernels
# (kernels/ops.py): their math is compiled once, not inlined into the neighbouring kernels of every layer.
def apply_fn(transforms: Sequence[Transform]) -> Callable:
    """The function that applies ``transforms`` in order."""
    def compress(x):
        for t in transforms:
            block = t.params.get("hadamard")
            if block:  # q(x R) Rᵀ along K: unbiased, the GEMM unchanged in expectation (kernels/hadamard.py)
                x = rotated(lambda y, t=t: t.spec.apply(y, **t.params), x, t.params["hadamard_dim"], block)
            else:
                x = t.spec.apply(x, **t.params)
        return x

    return compress


def gradient_steps(ctx: RewriteContext, rec: GemmRecord, role: Role, k, dim: int, dim_name: str, group: int = 0,
                   experts: object = 0) -> list:
    """The Transforms to apply to a gradient operand reduced over ``dim`` of size ``k``; records them.
    ``group``: the reduction splits into independent groups of this size (a grouped convolution's
    C_out / groups), which N:M groups must not cross. ``experts``: the reduction is each of this many
    experts' own tokens (a grouped GEMM's wgrad), of sizes known only at run time."""
    cfg, steps = ctx.config, []
    if cfg.pattern is not None and role in cfg.gemms:
        n, m = cfg.pattern
        k_int = k if isinstance(k, int) else None
        if experts:
            steps.append(Transform(cfg.method, {"n": n, "m": m, "dim": dim}, dim_name))
            rec.notes.append(f"{cfg.sparsity} groups start at each of the {experts} experts' first token; an "
                             "expert's last partial group is filled with zeros")
        elif group and group % m:
            rec.notes.append(
                f"{cfg.sparsity} skipped: a grouped convolution reduces each input channel's gradient over "
                f"its own {group} output channel(s) (C_out/groups), not a multiple of M={m}"
                + (": depthwise, no reduction to prune" if group == 1 else "")
            )
        elif k_int is not None and k_int < m:
            rec.notes.append(f"{cfg.sparsity} skipped: reduction size {k_int} < M={m}")
        else:
            steps.append(Transform(cfg.method, {"n": n, "m": m, "dim": dim}, dim_name))
            if k_int is None:
                rec.notes.append(f"symbolic reduction size {k}: a remainder mod {m} stays dense")
            elif k_int % m:
                rec.notes.append(f"reduction size {k_int} not divisible by {m}: last {k_int % m} stay dense")
    if cfg.quant is not None and (role.quantized or role in cfg.gemms):
        spec = OPS[cfg.quant]
        rows = {"dim": dim} if cfg.scales == "row" else {}  # one scale per row of the GEMM's output side
        steps.append(Transform(spec.name, {**cfg.params_for(spec), **rows,
                                           **_rotation(cfg, rec, k, dim, group, experts)}))
    rec.transforms.extend(steps)
    return steps


def _rotation(cfg: NMConfig, rec: GemmRecord, k, dim: int, group: int, experts: object) -> dict:
    """The quantizer's rotation parameters with ``hadamard`` set: blocks along the reduction ``dim``, each
    within one independent group of it (a grouped convolution's, an expert's), or a note why none."""
    block = cfg.hadamard
    if not block:
        return {}
    if experts:
        why = f"hadamard {block} skipped: each expert reduces over its own tokens, of sizes known at run time"
    else:
        why = check_block(block, k) or (group and check_block(block, group, " (within each conv group's output "
                                                                         "channels)"))
    if why:
        rec.notes.append(why)
        return {}
    return {"hadamard": block, "hadamard_dim": dim}


def why_unchanged(cfg: NMConfig, role: Role) -> str:
    """Why a backward GEMM of ``role`` got no gradient transform."""
    if not role.quantized and role not in cfg.gemms:
        return (f"{role} not in gemms={list(map(str, cfg.gemms))}: a gradient of an activation × activation GEMM "
                "propagates to every layer below, so it is compressed only where gemms names it")
    if cfg.pattern is not None and role not in cfg.gemms:
        return f"{role} not in gemms={list(map(str, cfg.gemms))} and no quant set"
    return "no gradient transform configured"


def compress(ctx: RewriteContext, operand: fx.Node, gemm: fx.Node, steps: Sequence[Transform], role: Role,
             fn: Optional[Callable] = None, inputs: Optional[Sequence[fx.Node]] = None) -> fx.Node:
    """``operand`` rebuilt as ``steps`` applied to it, spliced in before ``gemm``. ``fn`` and ``inputs``: a
    function of ``inputs`` that applies the steps its own way (a grouped GEMM's, within each expert)."""
    info = NodeInfo(tuple(t.op for t in steps), gemm.name, module_path(gemm), role)
    return ctx.splice(gemm, fn or apply_fn(steps), inputs or [operand], serves=gemm, info=info)

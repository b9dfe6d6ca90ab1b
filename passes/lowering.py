"""Which kernel runs each GEMM the rewrite touched: the ``lowering`` option (DESIGN.md §7).

Runs on the rewritten joint graph. ``emulate`` leaves it as it is: compressed values in the input
dtype, ordinary GEMMs. ``native`` replaces every GEMM whose operands are exact low-precision numbers
by a low-precision one (``kernels/gemm.py``), in this order of preference:

- ``2:4 fp8``: a 2:4-structured LUQ gradient times a SAWB operand, float8 codes on cuSPARSELt;
- ``fp8``: LUQ or SAWB codes on both sides (``torch._scaled_mm``, per-tensor scales);
- ``2:4``: a 2:4-structured gradient (MVUE/greedy 1:2, 2:4, or N:M with N <= 2 and 4 | M) in bf16/fp16.

The quantizers then hand out float8 codes and a scale (``nm.luq_fp8`` / ``nm.sawb_fp8``, the same
values), so FP8 activations and weights are also what the backward keeps. A GEMM that a device or
shape does not allow stays dense, and its record says why. ``auto`` is ``native`` on CUDA and
``emulate`` elsewhere.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.fx as fx

from nmcompile.kernels.fp8 import E4M3, FORMAT_NAMES, dequantize, luq_format
from nmcompile.kernels.gemm import cusparselt_version, native_support
from nmcompile.kernels.luq import luq_levels
from .analysis import layout_chain, module_path, val
from .config import NMConfig
from .records import GemmRecord, NodeInfo
from .splice import atomic, splice

aten = torch.ops.aten
nm = torch.ops.nm
_PRUNE = {nm.mvue.default: 2, nm.greedy.default: 1}  # op -> index of n in its args
_GEMMS = {aten.mm.default, aten.addmm.default}
_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclasses.dataclass
class _Operand:
    node: fx.Node  # the GEMM's operand
    base: fx.Node  # the node it is laid out from
    chain: list  # layout ops from base to node
    fp8: Optional[torch.dtype] = None  # its exact float8 format, if any
    sparse24: bool = False  # at most 2 nonzeros in every aligned group of 4 along the GEMM's K
    why: str = ""  # why it is neither


def _is_24(prune: fx.Node, operand: fx.Node, k_dim: int) -> str:
    """'' if ``prune``'s N:M groups make ``operand`` 2:4 along dim ``k_dim``, else why not."""
    n, m, dim = prune.args[_PRUNE[prune.target]:][:3]
    if not ((m % 4 == 0 and n <= 2) or (m == 2 and n == 1)):
        return f"{n}:{m} is not a 2:4 structure (that needs N <= 2 per 4 | M, or 1:2)"
    shape = val(operand).shape
    if dim % len(shape) != k_dim:
        return "the gradient is pruned along a dim that is not the GEMM operand's K"
    k = shape[k_dim]
    if not isinstance(k, int) or k % m or k % 4:
        return f"K={k} leaves a dense remainder (needs a multiple of {max(m, 4)})"
    return ""


def _classify(node: fx.Node, k_dim: int) -> _Operand:
    base, chain = layout_chain(node)
    op = _Operand(node, base, chain)
    target = getattr(base, "target", None)
    if target is nm.sawb.default:
        op.fp8 = E4M3 if base.args[1] <= 4 else None  # e4m3 holds the integers up to 16
        op.why = "" if op.fp8 else f"sawb{base.args[1]} codes exceed the integers e4m3 holds exactly"
        return op
    whys, prune = [], None
    if target is nm.luq.default:
        u = val(base.args[1])
        samples = u.shape[0] if u is not None and u.dim() == 1 and not u.is_floating_point() else 1
        op.fp8, why = luq_format(luq_levels(base.args[2], base.args[3]) - 1, samples)
        whys.append(why)
        src = base.args[0]
        prune = src if getattr(src, "target", None) in _PRUNE else None
    elif target in _PRUNE:
        prune = base
        whys.append("not quantized")
    else:
        whys.append("its values are not compressed")
    if prune is not None:
        why24 = "a layout op lies between the pruned gradient and the GEMM" if chain else _is_24(prune, node, k_dim)
        op.sparse24 = not why24
        whys.append(why24)
    op.why = "; ".join(w for w in whys if w)
    return op


def _static_chain(o: _Operand) -> bool:
    """The layout ops can be replayed on the codes: no symbolic sizes among their arguments."""
    return not any(isinstance(x, fx.Node) for link in o.chain for x in torch.utils._pytree.tree_leaves(link.args[1:]))


@dataclasses.dataclass
class _Plan:
    kernel: str  # "2:4 fp8" | "fp8" | "2:4" | "dense"
    note: Optional[str]
    left: Optional[_Operand] = None
    right: Optional[_Operand] = None


def _device(node: Optional[fx.Node]) -> Optional[torch.device]:
    tensors = [
        t
        for t in torch.utils._pytree.tree_leaves(val(node) if node is not None else None)
        if isinstance(t, torch.Tensor)
    ]
    return tensors[0].device if tensors else None


def _plan(node: Optional[fx.Node], rec: GemmRecord, lowering: str) -> _Plan:
    if lowering == "emulate":
        return _Plan("dense", None)
    device = _device(node)
    if lowering == "auto" and device is not None and device.type != "cuda":
        return _Plan("dense", f"lowering='auto' emulates on {device.type}")
    if node is None or node.target not in _GEMMS:
        return _Plan("dense", f"no native kernel for {rec.op} GEMMs (mm and addmm only)")
    if node.target is aten.addmm.default and (node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1):
        return _Plan("dense", "addmm with alpha/beta other than 1")
    out = val(node)
    a, b = (node.args[1], node.args[2]) if node.target is aten.addmm.default else node.args[:2]
    m, k = val(a).shape
    n = val(b).shape[1]
    left, right = _classify(a, 1), _classify(b, 0)
    if not all(isinstance(size, int) for size in (m, n, k)) or not (_static_chain(left) and _static_chain(right)):
        return _Plan("dense", "symbolic shapes: native kernels need static sizes")
    capability = torch.cuda.get_device_capability(out.device) if out.device.type == "cuda" else None
    sparse = left if left.sparse24 else right if right.sparse24 else None
    notes = []
    candidates = []
    if sparse is not None and left.fp8 and right.fp8:
        if left.fp8 == E4M3 and right.fp8 == E4M3:
            candidates.append("2:4 fp8")
        else:
            notes.append("2:4 fp8: cuSPARSELt takes e4m3 only")
    if left.fp8 and right.fp8:
        candidates.append("fp8")
    if sparse is not None:
        candidates.append("2:4")
    for kernel in candidates:
        why = native_support(kernel, out.device, capability, (m, n, k), out.dtype)
        if why is None:
            return _Plan(kernel, "; ".join(notes) or None, left, right)
        notes.append(f"{kernel}: {why}")
    if not candidates:
        whys = [f"{side} operand: {o.why}" for side, o in (("left", left), ("right", right)) if o.why]
        notes.append("no exact low-precision form (" + "; ".join(whys) + ")")
    return _Plan("dense", "; ".join(notes))


def _kernel_name(plan: _Plan, device: torch.device) -> str:
    if plan.kernel == "fp8":
        fmts = {FORMAT_NAMES[plan.left.fp8], FORMAT_NAMES[plan.right.fp8]}
        return "fp8 " + "×".join(sorted(fmts, reverse=True))
    if plan.kernel.startswith("2:4"):
        impl = "cusparselt" if device.type == "cuda" else "cpu"
        dtype = "fp8" if plan.kernel == "2:4 fp8" else _SHORT[val(plan.left.node).dtype]
        return f"2:4 {impl} {dtype}"
    return plan.kernel


class _Lowerer:
    def __init__(self, graph: fx.Graph, decompositions: dict):
        self.graph, self.decompositions = graph, decompositions
        self.sawb_codes: dict = {}  # nm.sawb node -> (codes node, scale node)

    def _codes_of_sawb(self, base: fx.Node) -> tuple:
        if base not in self.sawb_codes:
            info = dataclasses.replace(NodeInfo.read(base), op="sawb_fp8")
            bits = base.args[1]
            self.sawb_codes[base] = splice(
                self.graph,
                base.next,
                lambda x: torch.ops.nm.sawb_fp8.default(x, bits),
                [base.args[0]],
                serves=base,
                info=info,
                decompositions=self.decompositions,
            )
        return self.sawb_codes[base]

    def lower(self, node: fx.Node, rec: GemmRecord, plan: _Plan) -> None:
        inputs: list = []
        fp8 = plan.kernel in ("fp8", "2:4 fp8")

        def take(x) -> int:
            inputs.append(x)
            return len(inputs) - 1

        def operand_fn(o: _Operand):
            """A function of the spliced inputs giving (operand, scale or None)."""
            chain = [(link.target, link.args[1:], link.kwargs) for link in o.chain]

            def laid_out(t):
                for target, args, kwargs in chain:
                    t = target(t, *args, **kwargs)
                return t

            if not fp8:
                i = take(o.node)
                return lambda xs: (xs[i], None)
            if o.base.target is nm.sawb.default:
                codes, scale = self._codes_of_sawb(o.base)
                i, j = take(codes), take(scale)
                return lambda xs: (laid_out(xs[i]), xs[j])
            x, u, bits, levels = o.base.args
            i, j = take(x), take(u)

            def luq_fp8(xs):
                codes, scale = torch.ops.nm.luq_fp8.default(xs[i], xs[j], bits, levels)
                return laid_out(codes), scale

            return luq_fp8

        left_fn, right_fn = operand_fn(plan.left), operand_fn(plan.right)
        bias = take(node.args[0]) if node.target is aten.addmm.default else None
        out_dtype = val(node).dtype
        transposed = plan.kernel.startswith("2:4") and not plan.left.sparse24  # the sparse operand goes left

        def gemm(*xs):
            (a, sa), (b, sb) = left_fn(xs), right_fn(xs)
            if plan.kernel.startswith("2:4"):
                if transposed:  # A·B = (Bᵀ·Aᵀ)ᵀ
                    return torch.ops.nm.sparse24_mm.default(b.t(), a.t(), sb, sa, out_dtype).t()
                return torch.ops.nm.sparse24_mm.default(a, b, sa, sb, out_dtype)
            return torch.ops.nm.fp8_mm.default(a, sa, b, sb, xs[bias] if bias is not None else None, out_dtype)

        info = NodeInfo("gemm", node.name, module_path(node), rec.role, kernel=rec.kernel)
        new = splice(self.graph, node, gemm, inputs, serves=node, info=info, decompositions=self.decompositions)
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        rec.node = layout_chain(new)[0].name  # the record names the GEMM that runs now

    def finish(self) -> None:
        """SAWB outputs still used by dense GEMMs read the codes back (the same values)."""
        self.graph.eliminate_dead_code()
        for base, (codes, scale) in self.sawb_codes.items():
            if base.users:
                dtype = val(base).dtype
                deq = splice(
                    self.graph,
                    scale.next,
                    lambda c, s: dequantize(c, s, dtype),
                    [codes, scale],
                    serves=base,
                    info=dataclasses.replace(NodeInfo.read(base), op="dequantize"),
                    decompositions=self.decompositions,
                )
                base.replace_all_uses_with(deq)
                self.graph.erase_node(base)


def lower_gemms(graph: fx.Graph, records: list, config: NMConfig, decompositions: dict) -> None:
    """Pick every recorded GEMM's kernel (``rec.kernel``, ``rec.kernel_note``) and put it in ``graph``."""
    version = cusparselt_version()
    nodes = {n.name: n for n in graph.nodes}
    lowerer = _Lowerer(graph, decompositions)
    for rec in records:
        rec.cusparselt = version
        if not rec.transforms or rec.skipped:
            continue  # nothing compressed: the GEMM it always was
        node = nodes.get(rec.node)  # None for a convolution backward the rewrite split
        codes = dict(lowerer.sawb_codes)
        try:
            with atomic(graph):  # all or nothing: a failure leaves this GEMM exactly as emulated
                plan = _plan(node, rec, config.lowering)
                rec.kernel_note = plan.note
                if plan.kernel != "dense":
                    rec.kernel = _kernel_name(plan, val(node).device)
                    lowerer.lower(node, rec, plan)
        except Exception as err:  # never fail a user's compile, and say why
            lowerer.sawb_codes = codes
            rec.kernel, rec.kernel_note = "dense", f"native lowering failed ({type(err).__name__}: {err})"
    lowerer.finish()

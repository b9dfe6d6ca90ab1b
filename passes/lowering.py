"""Which kernel runs each GEMM the rewrite touched: the ``lowering`` option.

Runs on the rewritten joint graph. ``emulate`` leaves it as it is: compressed values in the input
dtype, ordinary GEMMs. ``auto`` (the default) and ``native`` replace every GEMM whose operands are
exact low-precision numbers by a low-precision one, the first of ``kernels.gemm.KERNELS`` (in order
of preference) whose operand forms both operands have and whose device and shape rules the GEMM meets:

- ``2:4 fp8``: a 2:4-structured quantized gradient times a quantized operand, float8 codes on cuSPARSELt;
- ``fp8``: float8 codes on both sides (``torch._scaled_mm``, per-tensor scales; CUDA sm89+);
- ``int8``: int8 codes on both sides (``torch._int_mm``, exact int32 sums; CPUs with AVX512-VNNI or
  AMX, CUDA sm80+);
- ``2:4``: a 2:4-structured gradient (a pruning op whose N:M is a 2:4 structure) in bf16/fp16.

``auto`` takes the kernels that pay on the device; ``native`` also the CPU's structure-checking 2:4
product (a dense GEMM: it tests the native graph without a GPU). FP8 GEMMs on CPU are a scalar
reference that only tests select (``kernels.gemm.cpu_reference_kernels``).

What an operand is comes from the op that produced it (``kernels.catalog``: its exact form, and
the ops that give its float8 or int8 codes). The quantizers then hand out codes and a scale (the
same values), so low-precision activations and weights are also what the backward keeps. A GEMM
that a device or shape does not allow stays dense, and its record says why.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Optional

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from nmcompile.kernels.catalog import Kind, OpSpec, Stage, spec_of
from nmcompile.kernels.fp8 import E4M3, dequantize
from nmcompile.kernels.gemm import (DENSE, DENSE_USE, KERNELS, Codes, CpuUse, GemmKernel, Lowering, cusparselt_version,
                                    int8_gemm)

from .analysis import LAYOUT_OPS, last_dim_is_k, layout_chain, module_path, val
from .config import NMConfig
from .records import GemmRecord, NodeInfo
from .roles import Role
from .splice import atomic, splice

aten = torch.ops.aten
_GEMMS = {aten.mm.default, aten.addmm.default}


@dataclasses.dataclass
class _Operand:
    node: fx.Node  # the GEMM's operand
    base: fx.Node  # the node it is laid out from
    chain: list  # layout ops from base to node
    spec: Optional[OpSpec] = None  # the quantizer that produced it
    fp8: Optional[torch.dtype] = None  # its exact float8 format, if any
    int8: bool = False  # it is exactly int8 codes times one scale (or one per row, constant along K)
    sparse24: bool = False  # at most 2 nonzeros in every aligned group of 4 along the GEMM's K
    why: str = ""  # why it is neither
    k_dim: int = 0  # the GEMM's contracted dim of this operand
    rows: bool = False  # its scales are per slice of its source (along ``scale_dim`` there)
    scale_dim: Optional[int] = None
    fold: bool = False  # its per-row scales vary along K: it gives its codes, its scales fold into the other side
    pow2: bool = False  # its scales are powers of two (folded into the other side, they leave a scale of 1)


def _params(node: fx.Node, spec: OpSpec) -> dict:
    return spec.params_of(tuple(val(a) if isinstance(a, fx.Node) else a for a in node.args))


def _is_24(prune: fx.Node, operand: fx.Node, k_dim: int) -> str:
    """'' if ``prune``'s N:M groups make ``operand`` 2:4 along dim ``k_dim``, else why not."""
    spec = spec_of(prune.target)
    params = _params(prune, spec)
    n, m, dim = params["n"], params["m"], params["dim"]
    if not spec.form(params).sparse24:
        return f"{n}:{m} is not a 2:4 structure (that needs N <= 2 per 4 | M, or 1:2)"
    shape = val(operand).shape
    if dim % len(shape) != k_dim:
        return "the gradient is pruned along a dim that is not the GEMM operand's K"
    k = shape[k_dim]
    if not isinstance(k, int) or k % m or k % 4:
        return f"K={k} leaves a dense remainder (needs a multiple of {max(m, 4)})"
    return ""


def _pruned(node) -> bool:
    spec = spec_of(getattr(node, "target", None))
    return spec is not None and spec.kind == Kind.PRUNE


def _scales_along_k(o: _Operand) -> bool:
    """Whether per-row scales of ``o``'s source are constant along the GEMM's K once laid out like the
    operand (so that they factor out of it): the operand is the source itself, reduced along the scales'
    dim, or the scales' dim is the source's last and lands at K (``analysis.last_dim_is_k``)."""
    if not o.chain:
        return o.scale_dim == o.k_dim
    return o.scale_dim == val(o.base).dim() - 1 and last_dim_is_k(o.node, o.k_dim)


def _foldable(o: _Operand) -> bool:
    """Whether per-row scales of ``o``'s source that vary along the GEMM's K depend on K alone: a 2D operand
    whose other dim is laid out from the source's last dim (along which the scales are constant)."""
    return val(o.node).dim() == 2 and o.scale_dim == val(o.base).dim() - 1 and last_dim_is_k(o.node, 1 - o.k_dim)


def _takes_fold(o: _Operand) -> bool:
    """Whether ``o`` is a gradient quantizer's output itself, so that scales along K can multiply its input."""
    return o.spec is not None and o.spec.stage == Stage.GRADIENT and not o.chain and o.int8


def _varying_why(spec: OpSpec) -> str:
    return (f"{spec.name}'s per-row scales vary along this GEMM's K (it contracts the dim they are per row of), so "
            "they do not factor out of an int8 GEMM")


def _rotated(node: fx.Node) -> bool:
    """``node`` is the last step of a gradient quantizer wrapped in a rotation (the rewrite's ``hadamard``)."""
    info = NodeInfo.read(node)
    return info is not None and info.role not in ("", Role.FWD) and spec_of(node.target) is None and any(
        spec_of(n.target) is not None for n in _ancestors_within(node, info))


def _ancestors_within(node: fx.Node, info: NodeInfo) -> list:
    """The nodes ``node`` is computed from that the same insertion made (its NodeInfo)."""
    seen, todo = [], [node]
    while todo:
        for n in todo.pop().all_input_nodes:
            if n not in seen and NodeInfo.read(n) == info:
                seen.append(n)
                todo.append(n)
    return seen


def _classify(node: fx.Node, k_dim: int) -> _Operand:
    base, chain = layout_chain(node)
    op = _Operand(node, base, chain, k_dim=k_dim)
    spec = spec_of(getattr(base, "target", None))
    whys, prune = [], None
    if spec is not None and spec.kind == Kind.QUANTIZE:
        params = _params(base, spec)
        form = spec.form(params)
        op.spec, op.pow2 = spec, form.pow2
        if form.rows:
            op.rows, op.scale_dim = True, params["dim"] % val(base).dim()
        if spec.int8_op is None:
            whys.append(f"{spec.name} has no int8 codes op")
        elif form.rows and not _scales_along_k(op):
            if spec.stage == Stage.FORWARD and _foldable(op):  # int8 if the other side takes the scales (_plan)
                op.int8, op.fold = form.int8, True
                whys.append(form.int8_why)
            else:
                whys.append(_varying_why(spec))
        else:
            op.int8 = form.int8
            whys.append(form.int8_why)
        if spec.codes_op is None:
            whys.append(f"{spec.name} has no float8 codes op")
        elif form.rows:
            whys.append(f"{spec.name} has per-row scales, and the FP8 GEMM takes one scale per tensor")
        else:
            op.fp8 = form.float8
            whys.append(form.why)
        if spec.stage == Stage.FORWARD:  # forward operands are never pruned
            op.why = "; ".join(w for w in whys if w)
            return op
        src = base.args[0]
        prune = src if _pruned(src) else None
    elif spec is not None and spec.kind == Kind.PRUNE:
        prune = base
        whys.append("not quantized")
    elif _rotated(base):
        whys.append("its codes are in a Hadamard-rotated basis (hadamard), rotated back; an int8 or FP8 GEMM on "
                    "them would need the other operand rotated and quantized too (not built)")
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
    kernel: GemmKernel
    note: Optional[str]
    left: Optional[_Operand] = None
    right: Optional[_Operand] = None


def _plan(node: Optional[fx.Node], rec: GemmRecord, lowering: Lowering) -> _Plan:
    if lowering == Lowering.EMULATE:
        return _Plan(DENSE, None)
    if node is None or node.target not in _GEMMS:
        return _Plan(DENSE, f"no native kernel for {rec.op} GEMMs (mm and addmm only)")
    if node.target is aten.addmm.default and (node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1):
        return _Plan(DENSE, "addmm with alpha/beta other than 1")
    out = val(node)
    a, b = (node.args[1], node.args[2]) if node.target is aten.addmm.default else node.args[:2]
    m, k = val(a).shape
    n = val(b).shape[1]
    left, right = _classify(a, 1), _classify(b, 0)
    folds = []
    for side, o, other in (("left", left, right), ("right", right, left)):
        if o.fold and _takes_fold(other):
            folds.append(f"the {side} operand's per-row scales, which vary along K, multiply the gradient before it is "
                         "quantized (E[q(g·s)] @ codes = g @ (s·codes)), so the GEMM takes their int8 codes")
        elif o.fold:
            o.int8 = o.fold = False
            o.why = "; ".join(w for w in (o.why, _varying_why(o.spec) + ", and the other operand is not a gradient "
                                          "quantizer's own output to fold them into") if w)
    if not all(isinstance(size, int) for size in (m, n, k)) or not (_static_chain(left) and _static_chain(right)):
        return _Plan(DENSE, "symbolic shapes: native kernels need static sizes")
    capability = torch.cuda.get_device_capability(out.device) if out.device.type == "cuda" else None
    sparse = left.sparse24 or right.sparse24
    codes = {Codes.FLOAT8: bool(left.fp8 and right.fp8), Codes.INT8: left.int8 and right.int8, None: True}
    notes = []
    candidates = []
    for kernel in KERNELS.values():
        if kernel is DENSE or (kernel.sparse24 and not sparse) or not codes[kernel.codes]:
            continue
        if kernel.sparse24 and kernel.float8 and not (left.fp8 == E4M3 and right.fp8 == E4M3):
            notes.append(f"{kernel.name}: cuSPARSELt takes e4m3 only")
            continue
        candidates.append(kernel)
    skipped = []  # (kernel, why not) of better kernels
    for kernel in candidates:
        why = kernel.support(out.device, capability, (m, n, k), out.dtype, lowering)
        if why is None:
            # a CPU's reference kernels are never the choice: naming them beside every choice is noise
            notes += [f"{k.name}: {w}" for k, w in skipped
                      if not (out.device.type == "cpu" and k.cpu == CpuUse.REFERENCE)]
            notes += folds if kernel.codes == Codes.INT8 else []
            return _Plan(kernel, "; ".join(notes) or None, left, right)
        skipped.append((kernel, why))
    notes += [f"{k.name}: {w}" for k, w in skipped]
    whys = [f"{side} operand: {o.why}" for side, o in (("left", left), ("right", right)) if o.why]
    if whys:  # why the other kernels were not candidates
        notes.append("no exact low-precision form (" + "; ".join(whys) + ")")
    return _Plan(DENSE, "; ".join(notes))


def _codes_op(spec: OpSpec, codes: Codes) -> str:
    """The op giving ``spec``'s output as ``codes`` (float8 or int8) and a scale."""
    return spec.codes_op if codes == Codes.FLOAT8 else spec.int8_op


def _codes_fn(spec: OpSpec, args: tuple, codes: Codes):
    codes_op = getattr(torch.ops.nm, _codes_op(spec, codes)).default
    return lambda *xs, **kwargs: codes_op(*xs, *args, **kwargs)


class _Lowerer:
    def __init__(self, graph: fx.Graph, decompositions: dict, recompute: bool = False):
        self.graph, self.decompositions, self.recompute = graph, decompositions, recompute
        self.forward_codes: dict = {}  # (forward quantizer node, Codes) -> (codes node, scale node)

    def _codes_of_forward(self, base: fx.Node, spec: OpSpec, codes: Codes) -> tuple:
        """A forward quantizer's codes, computed once right after it: the forward GEMM and the
        backward GEMMs that reuse its output all read them (and the backward keeps only them)."""
        if (base, codes) not in self.forward_codes:
            self.forward_codes[base, codes] = splice(
                self.graph,
                base.next,
                _codes_fn(spec, tuple(base.args[1:]), codes),
                [base.args[0]],
                serves=base,
                info=dataclasses.replace(NodeInfo.read(base), op=(_codes_op(spec, codes),)),
                decompositions=self.decompositions,
            )
        return self.forward_codes[base, codes]

    def lower(self, node: fx.Node, rec: GemmRecord, plan: _Plan) -> None:
        inputs: list = []
        folded: list = []  # a forward operand's function of the inputs giving its scales along K (see _plan)

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

            def laid_out_scale(scale, codes):
                """The scale(s) laid out like the operand: 0-d, or per row as [M, 1] / [1, N] (constant along K)."""
                if not o.rows:
                    return scale
                return laid_out(scale.expand(codes.shape)).narrow(o.k_dim, 0, 1)

            if plan.kernel.codes is None:
                i = take(o.node)
                return lambda xs: (xs[i], None)
            if o.spec.stage == Stage.FORWARD:
                codes, scale = self._codes_of_forward(o.base, o.spec, plan.kernel.codes)
                i, j = take(codes), take(scale)
                if o.fold and plan.kernel.codes == Codes.INT8:
                    # its scales, constant along the other dim, laid out like the other operand's K: [1, K] / [K, 1]
                    folded.append(lambda xs: laid_out(xs[j].expand(xs[i].shape)).narrow(1 - o.k_dim, 0, 1).t())
                    return lambda xs: (laid_out(xs[i]), torch.ones((), dtype=torch.float32, device=xs[i].device))
                return lambda xs: (laid_out(xs[i]), laid_out_scale(xs[j], xs[i]))
            # a gradient quantizer feeds this GEMM only: its codes are computed here, from its inputs
            tensors = [a for a in o.base.args if isinstance(a, fx.Node)]
            positions = [take(a) for a in tensors]
            codes_of = _codes_fn(o.spec, tuple(o.base.args[len(tensors):]), plan.kernel.codes)

            def gradient_codes(xs):
                args = [xs[i] for i in positions]
                # q(g·s) @ codes: unbiased for g @ (s·codes), as q(g) @ (s·codes) is; the int8 codes op
                # forms g·s as it reads g (no fp32 product in between)
                codes, scale = codes_of(*args, times=folded[0](xs)) if folded else codes_of(*args)
                return laid_out(codes), laid_out_scale(scale, codes)

            return gradient_codes

        left_fn, right_fn = operand_fn(plan.left), operand_fn(plan.right)
        bias = take(node.args[0]) if node.target is aten.addmm.default else None
        out_dtype = val(node).dtype
        transposed = plan.kernel.sparse24 and not plan.left.sparse24  # the sparse operand goes left
        # both scales powers of two: the sums rescale by one in fp32, exactly (kernels/int8.py); a folded
        # side's scales multiply the other side's input, so that side's codes carry them
        pow2 = plan.left.pow2 and plan.right.pow2

        def gemm(*xs):
            (a, sa), (b, sb) = left_fn(xs), right_fn(xs)
            if plan.kernel.sparse24:
                if transposed:  # A·B = (Bᵀ·Aᵀ)ᵀ
                    return torch.ops.nm.sparse24_mm.default(b.t(), a.t(), sb, sa, out_dtype).t()
                return torch.ops.nm.sparse24_mm.default(a, b, sa, sb, out_dtype)
            if plan.kernel.codes == Codes.INT8:  # inlined: Inductor fuses the scaling into the output's consumer
                return int8_gemm(a, sa, b, sb, xs[bias] if bias is not None else None, out_dtype, pow2)
            return torch.ops.nm.fp8_mm.default(a, sa, b, sb, xs[bias] if bias is not None else None, out_dtype)

        info = NodeInfo(("gemm",), node.name, module_path(node), rec.role, kernel=rec.kernel)
        # A forward int8 GEMM is exact, so the backward can recompute its output from the codes it keeps anyway.
        # Only in fp32: Inductor keeps a bf16 result that it fuses into its consumer in fp32, unrounded, so
        # a bf16 output recomputed inside a backward kernel would not be the one the forward stored.
        recompute = (self.recompute and rec.role == Role.FWD and plan.kernel.codes == Codes.INT8
                     and out_dtype == torch.float32)
        new = splice(self.graph, node, gemm, inputs, serves=node, info=info, decompositions=self.decompositions,
                     recompute=recompute)
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        rec.node = layout_chain(new)[0].name  # the record names the GEMM that runs now

    def finish(self) -> None:
        """Forward quantizer outputs still used by dense GEMMs read the codes back (the same values)."""
        self.graph.eliminate_dead_code()
        read_back = {}
        for (base, _), nodes in self.forward_codes.items():
            read_back.setdefault(base, nodes)
        for base, (codes, scale) in read_back.items():
            if base.users:
                dtype = val(base).dtype
                deq = splice(
                    self.graph,
                    scale.next,
                    lambda c, s: dequantize(c, s, dtype),
                    [codes, scale],
                    serves=base,
                    info=dataclasses.replace(NodeInfo.read(base), op=("dequantize",)),
                    decompositions=self.decompositions,
                )
                base.replace_all_uses_with(deq)
                self.graph.erase_node(base)


def _formats(plan: _Plan) -> tuple:
    def fmt(o: _Operand):
        return {Codes.FLOAT8: o.fp8, Codes.INT8: torch.int8}.get(plan.kernel.codes) or val(o.node).dtype

    return fmt(plan.left), fmt(plan.right)


# what lies between a qkv GEMM and attention's q, k, v: layouts, the split into three, a bias added after an mm
_TO_QKV = LAYOUT_OPS | {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int,
                        aten.slice.Tensor, aten.select.int, operator.getitem, aten.unsqueeze.default,
                        aten.squeeze.dim, aten.squeeze.default, aten.expand.default, aten.unflatten.int,
                        aten.add.Tensor}


def _from_recomputed(node) -> list:
    """The ops laying out or splitting ``node`` (q, k or v) from a node the backward recomputes (a qkv GEMM's
    output), node included; [] where it comes from anything else."""
    path = []
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _TO_QKV:
        path.append(node)
        node = node.args[0]
    recomputed = isinstance(node, fx.Node) and node.meta.get("recompute") is CheckpointPolicy.PREFER_RECOMPUTE
    return path or [node] if recomputed else []


def recompute_attention(graph: fx.Graph) -> list:
    """Tag fused-attention forwards whose q, k and v the backward recomputes (from an int8 GEMM's codes) for the
    partitioner to recompute too, as flash attention's own backward recomputes its probabilities: the backward then
    keeps the codes, not the attention output. fp32 only (the reason the GEMMs' recompute is); the same kernel on
    the same inputs gives the same bits. Returns the tagged nodes."""
    tagged = []
    for node in graph.nodes:
        name = getattr(node.target, "__name__", "")
        if node.op != "call_function" or "scaled_dot_product" not in name or "backward" in name:
            continue
        out = val(node)
        first = out[0] if isinstance(out, (tuple, list)) else out
        if not (isinstance(first, torch.Tensor) and first.dtype == torch.float32):
            continue
        paths = [_from_recomputed(a) for a in node.args[:3]]
        if all(paths):  # the ops from the GEMM to q, k, v too: else the partitioner may keep q, k, v instead
            for n in (node, *[u for u in node.users if u.target is operator.getitem], *(n for p in paths for n in p)):
                n.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
            tagged.append(node)
    return tagged


def lower_gemms(graph: fx.Graph, records: list, config: NMConfig, decompositions: dict) -> None:
    """Pick every recorded GEMM's kernel (``rec.kernel``, ``rec.kernel_note``) and put it in ``graph``."""
    version = cusparselt_version()
    nodes = {n.name: n for n in graph.nodes}
    lowerer = _Lowerer(graph, decompositions, config.recompute)
    for rec in records:
        rec.cusparselt = version
        if not rec.transforms or rec.skipped:
            continue  # nothing compressed: the GEMM it always was
        node = nodes.get(rec.node)  # None for a convolution backward the rewrite split
        codes = dict(lowerer.forward_codes)
        try:
            with atomic(graph):  # all or nothing: a failure leaves this GEMM exactly as emulated
                plan = _plan(node, rec, config.lowering)
                rec.kernel_note = plan.note
                if plan.kernel is not DENSE:
                    rec.kernel = plan.kernel.use(_formats(plan), val(node).device, val(plan.left.node).dtype)
                    lowerer.lower(node, rec, plan)
        except Exception as err:  # never fail a user's compile, and say why
            lowerer.forward_codes = codes
            rec.kernel, rec.kernel_note = DENSE_USE, f"native lowering failed ({type(err).__name__}: {err})"
    lowerer.finish()
    if config.recompute:
        recompute_attention(graph)

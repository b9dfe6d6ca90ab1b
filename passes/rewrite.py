"""The joint-graph rewrite: compress neural gradients before backward GEMMs, quantize forward
GEMM operands, and record every decision (docs/architecture.md, "The pass")."""
from __future__ import annotations

import contextlib
import operator
import re
from typing import Callable, Optional

import torch
import torch.fx as fx

from nmcompile.kernels.catalog import OPS, Kind
from nmcompile.kernels.hadamard import check_block, rotated
from .analysis import (
    CONV_BWD, CONV_FWD, MATMULS, cast_source, forward_partners, is_fused_attention_backward, is_tangent, last_dim_is_k,
    layout_chain, matmul_operands, module_path, size_str, tangent_descendants, val,
)
from .config import NMConfig
from .ends import ModelEnds
from .grouped import grouped_role, grouped_shape, is_grouped_mm, is_opaque_grouped_mm, offsets, within_experts
from .lowering import lower_gemms
from .records import GemmRecord, NodeInfo, Transform
from .roles import ROLES, GraphRoles
from .seeds import merge_seed_draws
from .speed import dense_is_faster
from .splice import atomic, splice

aten = torch.ops.aten


class _Rewriter:
    def __init__(self, graph: fx.Graph, config: NMConfig, decompose: bool, graph_index: int,
                 ends: Optional[ModelEnds], roles: GraphRoles, partners: dict):
        self.graph, self.config, self.decompose, self.graph_index = graph, config, decompose, graph_index
        self.ends = ends
        self.roles = roles  # each backward matmul's role and why
        self.partners = partners  # seq_nr -> the forward GEMM a backward GEMM differentiates
        self.records: list[GemmRecord] = []
        self.quantized: dict = {}  # forward operand source -> (its quantized node, the Transform)
        self.quantized_gemms: set = set()  # forward GEMMs whose operands were quantized
        self.dense_layers: dict = {}  # forward GEMM -> why its layer stays dense (dense_if_faster)
        if decompose:
            from torch._inductor.decomposition import select_decomp_table

            self.decompositions = select_decomp_table()
        else:
            self.decompositions = {}

    # -- the ops: opaque calls, each drawing its seeds from torch's generator ----------------
    # Inductor calls them as extern kernels (kernels/ops.py): their math is compiled once, not
    # inlined into the neighbouring kernels of every layer.
    @staticmethod
    def _apply_fn(transforms: list) -> Callable:
        def compress(x):
            for t in transforms:
                block = t.params.get("hadamard")
                if block:  # q(x R) Rᵀ along K: unbiased, the GEMM unchanged in expectation (kernels/hadamard.py)
                    x = rotated(lambda y, t=t: t.spec.apply(y, **t.params), x, t.params["hadamard_dim"], block)
                else:
                    x = t.spec.apply(x, **t.params)
            return x

        return compress

    def _forward_transform(self, where: str, dim: Optional[int] = None) -> Transform:
        spec = OPS[self.config.fwd_quant]
        rows = {"dim": dim} if dim is not None else {}
        return Transform(spec.name, {**self.config.params_for(spec), **rows}, where)

    def _source_dim(self, operand: fx.Node, k_dim: int, rec: GemmRecord) -> Optional[int]:
        """With ``fwd_scales="row"``: the dim of the tensor ``operand`` is laid out from that holds the
        forward GEMM's K (its per-row scales are shared along it), None for one scale per tensor."""
        if self.config.fwd_scales != "row":
            return None
        if last_dim_is_k(operand, k_dim):
            return val(layout_chain(operand)[0]).dim() - 1
        note = (f"{operand.name}: its K is not its source's last dim (or merges it with others), so one scale "
                "per tensor")
        if note not in rec.notes:
            rec.notes.append(note)
        return None

    # -- bookkeeping ----------------------------------------------------------------------------
    def _record(self, node: fx.Node, op: str, role: str, shape: tuple) -> GemmRecord:
        out = val(node)
        dtype = (
            out[0].dtype
            if isinstance(out, (tuple, list)) and out and out[0] is not None
            else getattr(out, "dtype", None)
        )
        rec = GemmRecord(
            self.graph_index, node.name, op, role, module_path(node), _shape(shape), str(dtype).replace("torch.", "")
        )
        self.records.append(rec)
        return rec

    @contextlib.contextmanager
    def _transaction(self, *recs: GemmRecord):
        """One GEMM's rewrite, all or nothing: on any error its inserted nodes are erased, the caches
        restored, and its records say "not understood" (the pass never fails a user's compile)."""
        quantized, quantized_gemms = dict(self.quantized), set(self.quantized_gemms)
        try:
            with atomic(self.graph):
                yield
        except Exception as err:  # noqa: BLE001
            self.quantized, self.quantized_gemms = quantized, quantized_gemms
            for rec in recs:
                rec.transforms.clear()
                rec.notes.clear()
                rec.skipped = f"not understood ({type(err).__name__}: {err})"

    def _selected(self, rec: GemmRecord) -> bool:
        cfg = self.config
        if cfg.include is not None and not re.search(cfg.include, rec.module):
            rec.skipped = f"module {rec.module!r} does not match include={cfg.include!r}"
            return False
        if cfg.exclude is not None and re.search(cfg.exclude, rec.module):
            rec.skipped = f"module {rec.module!r} matches exclude={cfg.exclude!r}"
            return False
        return True

    # -- forward quantization -------------------------------------------------------------------
    def _quantize_source(self, operand: fx.Node, gemm: fx.Node, dim: Optional[int]) -> tuple:
        """Quantize the tensor ``operand`` is laid out from (``dim``: its per-row scales' dim); returns the
        operand rebuilt on it and the Transform. A source is quantized once, for its first GEMM."""
        base, chain = layout_chain(operand)
        if base not in self.quantized:
            anchor = base.next
            while anchor.op == "placeholder":  # keep placeholders first
                anchor = anchor.next
            quantize = self._forward_transform("W,X", dim)
            info = NodeInfo(quantize.op, gemm.name, module_path(gemm), "fwd", bits=quantize.params["bits"])
            self.quantized[base] = splice(
                self.graph, anchor, self._apply_fn([quantize]), [base], serves=gemm, info=info,
                decompositions=self.decompositions,
            ), quantize
        node, quantize = self.quantized[base]
        return self._replay(chain, node, before=gemm), quantize

    def _replay(self, chain: list, new_base: fx.Node, before: fx.Node) -> fx.Node:
        node = new_base
        with self.graph.inserting_before(before):
            for link in chain:
                prev = node
                node = self.graph.node_copy(link, lambda n, src=link.args[0], p=prev: p if n is src else n)
        return node

    def _requantized(self, operand: fx.Node, gemm: fx.Node, partner: Optional[fx.Node]) -> Optional[tuple]:
        """(the backward GEMM's non-gradient operand rebuilt on its quantized source, the Transform), when
        the forward GEMM it differentiates was quantized (a source shared with a high-precision GEMM is not)."""
        if partner is not None and partner not in self.quantized_gemms:
            return None
        base, chain = layout_chain(operand)
        if base in self.quantized:
            node, quantize = self.quantized[base]
            return self._replay(chain, node, before=gemm), quantize
        return None

    def _kept(self, gemms: list) -> dict:
        """The forward GEMMs ``keep_first_last`` keeps, each with the reason its record gives: those whose
        weight is the model's first or last layer, or, with no model found, the graph's own first and last."""
        if not self.config.keep_first_last or not gemms:
            return {}
        if self.ends is None:
            which = {gemms[0]: "first", gemms[-1]: "last" if gemms[-1] is not gemms[0] else "first and last"}
            return {node: f"{w} forward GEMM of graph {self.graph_index} kept in high precision (keep_first_last=True; "
                          "its parameters belong to no module running when it compiled, so each graph keeps its own)"
                    for node, w in which.items()}
        primals = (n for n in self.graph.nodes if n.op == "placeholder" and not is_tangent(n))
        inputs = {n: i for i, n in enumerate(primals)}  # the joint graph's primals are the Dynamo graph's inputs
        kept = {}
        for node in gemms:
            operands = [node.args[1]] if node.target is CONV_FWD else list(matmul_operands(node))
            # through autocast's cast too: under autocast the kept layer runs in bf16, as Inductor would run it
            roles = {r for op in operands for r in self.ends.roles(inputs.get(cast_source(op), -1))}
            if roles:
                which = [w for w in ("first", "last") if w in roles]
                names = " and ".join(dict.fromkeys(getattr(self.ends, w) for w in which))
                kept[node] = (f"{' and '.join(which)} layer of the model ({self.ends.model}.{names}) kept in high "
                              "precision (keep_first_last=True)")
        return kept

    def forward_gemms(self, gemms: list) -> None:
        cfg = self.config
        kept = self._kept(gemms)
        for node in gemms:
            op = "conv" if node.target is CONV_FWD else "grouped_mm" if is_grouped_mm(node) else MATMULS[node.target]
            rec = self._record(node, op, "fwd", ("?",) * 3)
            with self._transaction(rec):
                if node.target is CONV_FWD:
                    rec.shape = _shape(_conv_fwd_shape(node))
                    operands = [node.args[0], node.args[1]]
                elif op == "grouped_mm":
                    rec.shape = _shape(grouped_shape(node)[0])
                    operands = []
                else:
                    left, right = matmul_operands(node)
                    rec.shape = _shape(_matmul_shape(left, right))
                    operands = [left, right]
                if cfg.fwd_quant is None:
                    continue
                if node in kept:
                    rec.skipped = kept[node]
                    continue
                if not operands:
                    rec.skipped = f"{cfg.fwd_quant} forward quantization of grouped (expert) GEMMs is not implemented"
                    continue
                if not self._selected(rec):
                    continue
                if cfg.dense_if_faster and node.target is not CONV_FWD and val(left).dim() == 2:  # a Linear layer
                    why = dense_is_faster(*_matmul_shape(left, right), val(left).dtype, val(left).device, cfg)
                    if why is not None:
                        rec.skipped = self.dense_layers[node] = why
                        continue
                k_dims = (-1, -2) if node.target is not CONV_FWD else (None, None)  # conv: per tensor
                new = [self._quantize_source(operand, node, None if k is None else self._source_dim(operand, k, rec))
                       for operand, k in zip(operands, k_dims)]  # insertions only
                for operand, (quantized, _) in zip(operands, new):  # then the change
                    node.replace_input_with(operand, quantized)
                self.quantized_gemms.add(node)
                rows = [t for _, t in new if "dim" in t.params]
                rec.transforms.append(rows[0] if len(rows) == len(new) else self._forward_transform("W,X"))

    # -- backward GEMMs -------------------------------------------------------------------------
    def _gradient_steps(self, rec: GemmRecord, role: str, k, dim: int, dim_name: str, group: int = 0,
                        experts: object = 0) -> list:
        """The Transforms to apply to a gradient operand reduced over ``dim`` of size ``k``; records them.
        ``group``: the reduction splits into independent groups of this size (a grouped convolution's
        C_out / groups), which N:M groups must not cross. ``experts``: the reduction is each of this many
        experts' own tokens (a grouped GEMM's wgrad), of sizes known only at run time."""
        cfg, steps = self.config, []
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
        if cfg.quant is not None and (ROLES[role].quantized or role in cfg.gemms):
            spec = OPS[cfg.quant]
            rows = {"dim": dim} if cfg.scales == "row" else {}  # one scale per row of the GEMM's output side
            steps.append(Transform(spec.name, {**cfg.params_for(spec), **rows, **self._rotation(rec, k, dim, group,
                                                                                                 experts)}))
        rec.transforms.extend(steps)
        return steps

    def _rotation(self, rec: GemmRecord, k, dim: int, group: int, experts: object) -> dict:
        """The quantizer's rotation parameters with ``hadamard`` set: blocks along the reduction ``dim``, each
        within one independent group of it (a grouped convolution's, an expert's), or a note why none."""
        block = self.config.hadamard
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

    def _why_unchanged(self, role: str) -> str:
        cfg = self.config
        if not ROLES[role].quantized and role not in cfg.gemms:
            return (f"{role} not in gemms={list(cfg.gemms)}: a gradient of an activation × activation GEMM propagates "
                    "to every layer below, so it is compressed only where gemms names it")
        if cfg.pattern is not None and role not in cfg.gemms:
            return f"{role} not in gemms={list(cfg.gemms)} and no quant set"
        return "no gradient transform configured"

    def _compress(self, operand: fx.Node, gemm: fx.Node, steps: list, role: str, experts=None) -> fx.Node:
        """``operand`` rebuilt as ``steps`` applied to it, spliced in before ``gemm``. ``experts=(offs, dim)``: the
        first step prunes in groups that start at each expert's first token along ``dim`` (a grouped GEMM's wgrad)."""
        fn, inputs = self._apply_fn(steps), [operand]
        if experts is not None:
            offs, dim = experts
            prune, after = steps[0], self._apply_fn(steps[1:])
            params = {**prune.params, "dim": 0}
            pruned = within_experts(lambda x: prune.spec.apply(x, **params), prune.params["m"], dim)
            fn, inputs = (lambda x, o: after(pruned(x, o))), [operand, offs]
        info = NodeInfo("+".join(t.op for t in steps), gemm.name, module_path(gemm), role)
        return splice(self.graph, gemm, fn, inputs, serves=gemm, info=info, decompositions=self.decompositions)

    def backward_grouped(self, node: fx.Node, grads: set) -> None:
        """A grouped (expert) GEMM of the backward: dgrad pruned along the features like any dgrad, wgrad along
        each expert's own tokens; quantizers per tensor."""
        rec = self._record(node, "grouped_mm", "?", ("?",) * 3)
        with self._transaction(rec):
            shape, experts = grouped_shape(node)
            rec.shape = _shape(shape)
            role, why, index = grouped_role(node, grads)
            if role is None:
                rec.skipped = why
                return
            rec.role, rec.role_why = role, why
            if not self._selected(rec):
                return
            grad = node.args[index]
            if role == "dgrad":  # gy[T, N] times the experts' weights: reduced over N
                steps = self._gradient_steps(rec, role, val(grad).shape[1], 1, "K (features)")
                new = self._compress(grad, node, steps, role) if steps else None
            else:  # reduced over the tokens: dim 1 of a [P, T] left operand, dim 0 of a [T, Q] right one
                dim = 1 if index == 0 else 0
                steps = self._gradient_steps(rec, role, val(grad).shape[dim], dim, "K (tokens, per expert)",
                                             experts=experts)
                within = (offsets(node), dim) if steps and steps[0].spec.kind == Kind.PRUNE else None
                new = self._compress(grad, node, steps, role, within) if steps else None
            if new is None:
                if not rec.notes:
                    rec.skipped = self._why_unchanged(role)
                return
            node.replace_input_with(grad, new)

    def backward_matmul(self, node: fx.Node, grads: set) -> None:
        rec = self._record(node, MATMULS[node.target], "?", ("?",) * 3)
        with self._transaction(rec):
            left, right = matmul_operands(node)
            rec.shape = _shape(_matmul_shape(left, right))
            if val(left) is None or val(right) is None:
                rec.skipped = "operands have no fake values"
                return
            grad_left, grad_right = left in grads, right in grads
            if grad_left == grad_right:
                rec.skipped = (
                    "both operands depend on the incoming gradient" if grad_left else "no operand is a gradient"
                )
                return
            partner = self.partners.get(node.meta.get("seq_nr"))
            role, why = self.roles[node]
            if role is None:
                rec.skipped = why
                return
            rec.role, rec.role_why = role, why
            if partner in self.dense_layers:
                rec.skipped = self.dense_layers[partner]
                return
            other, grad = (right, left) if grad_left else (left, right)
            changes = []  # (old input, new input): made once everything is inserted
            requant = self._requantized(other, node, partner)
            if requant is not None:
                changes.append((other, requant[0]))
                rec.transforms.append(Transform(requant[1].op, requant[1].params, ROLES[role].other))
            if self._selected(rec):
                dim = val(grad).dim() - (1 if grad_left else 2)  # the reduction dim of the gradient operand
                steps = self._gradient_steps(rec, role, val(grad).shape[dim], dim, ROLES[role].reduces)
                if steps:
                    changes.append((grad, self._compress(grad, node, steps, role)))
                elif not rec.transforms and not rec.notes:
                    rec.skipped = self._why_unchanged(role)
            for old, new in changes:
                node.replace_input_with(old, new)

    def backward_conv(self, node: fx.Node, grads: set) -> None:
        mask = list(node.args[10])
        getitems = {u.args[1]: u for u in node.users if u.target is _getitem}
        roles = [(index, role) for index, role in ((0, "dgrad"), (1, "wgrad")) if mask[index] and index in getitems]
        recs = {index: self._record(node, "conv", role, ("?",) * 3) for index, role in roles}
        for index, rec in recs.items():
            rec.role_why = ("convolution_backward's input gradient" if index == 0 else
                            "convolution_backward's weight gradient")
        with self._transaction(*recs.values()):
            grad, x, w = node.args[0], node.args[1], node.args[2]
            partner = self.partners.get(node.meta.get("seq_nr"))
            new_x, new_w = ((self._requantized(t, node, partner) or (t, None))[0] for t in (x, w))
            replaced = []  # (old getitem, its replacement): made once everything is inserted
            for index, role in roles:
                rec = recs[index]
                rec.shape = _shape(_conv_bwd_shape(node, role))
                if new_x is not x or new_w is not w:
                    rec.transforms.append(self._forward_transform(ROLES[role].other))
                g = grad
                if grad in grads and self._selected(rec):
                    # dgrad reduces over output channels (dim 1), within each conv group; wgrad over N·H·W:
                    # group along W.
                    dim = 1 if role == "dgrad" else val(grad).dim() - 1
                    groups = _conv_groups(node)
                    group = val(grad).shape[1] // groups if role == "dgrad" and groups > 1 else 0
                    steps = self._gradient_steps(
                        rec, role, val(grad).shape[dim], dim, "C_out" if role == "dgrad" else "W (tokens)", group
                    )
                    if steps:
                        g = self._compress(grad, node, steps, role)
                if g is grad and new_x is x and new_w is w:
                    continue
                one = [i == index for i in range(3)]
                with self.graph.inserting_before(node):
                    split = self.graph.call_function(CONV_BWD, (g, new_x, new_w, *node.args[3:10], one))
                    split.meta.update(node.meta)
                    item = self.graph.call_function(_getitem, (split, index))
                    item.meta.update(getitems[index].meta)
                replaced.append((getitems[index], item))
                mask[index] = False
            for old, item in replaced:
                old.replace_all_uses_with(item)
                self.graph.erase_node(old)
            if not any(mask[:2]) and not (mask[2] and 2 in getitems):
                for user in list(node.users):
                    self.graph.erase_node(user)
                self.graph.erase_node(node)
            elif mask != list(node.args[10]):
                node.update_arg(10, mask)


_getitem = operator.getitem


def _shape(shape: tuple) -> tuple:
    return tuple(size_str(s) for s in shape)


def _matmul_shape(left: fx.Node, right: fx.Node) -> tuple:
    a, b = val(left), val(right)
    if a is None or b is None:
        return ("?", "?", "?")
    rows = a.shape[-2] * a.shape[0] if a.dim() == 3 else a.shape[-2]
    return (rows, b.shape[-1], a.shape[-1])


def _conv_fwd_shape(node: fx.Node) -> tuple:
    out, w = val(node), val(node.args[1])
    if out is None or w is None:
        return ("?", "?", "?")
    tokens = out.shape[0] * out.shape[2:].numel()
    return (tokens, w.shape[0], w.shape[1:].numel())


def _conv_groups(node: fx.Node) -> int:
    """``groups`` of a convolution_backward node (1 for a transposed convolution, whose weight layout differs)."""
    groups, transposed = node.args[9], node.args[7]
    return groups if isinstance(groups, int) and not transposed else 1


def _conv_bwd_shape(node: fx.Node, role: str) -> tuple:
    """(M, N, K) of a convolution's backward GEMM, K per conv group: dgrad reduces each input channel's
    gradient over the C_out/groups output channels of its group (× the kernel positions)."""
    grad, x, w = (val(a) for a in node.args[:3])
    if grad is None or x is None or w is None:
        return ("?", "?", "?")
    if role == "dgrad":
        groups = _conv_groups(node)
        return (x.shape[0] * x.shape[2:].numel(), w.shape[1] * groups, w.shape[0] // groups * w.shape[2:].numel())
    return (w.shape[0], w.shape[1:].numel(), grad.shape[0] * grad.shape[2:].numel())


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
    fwd = [
        n
        for n in nodes
        if (n.target in MATMULS or n.target is CONV_FWD or is_grouped_mm(n))
        and n not in grads
        and n.meta.get("partitioner_tag") != "is_backward"
    ]
    roles = GraphRoles(graph, parameters, grads, partners)  # reads the graph as it is before the rewrite
    rw = _Rewriter(graph, config, decompose, graph_index, ends, roles, partners)
    rw.forward_gemms(fwd)
    for node in nodes:
        if node.target in MATMULS and node not in fwd:
            rw.backward_matmul(node, grads)
        elif is_fused_attention_backward(node):
            rw.records.append(
                GemmRecord(
                    graph_index,
                    node.name,
                    "sdpa",
                    "?",
                    module_path(node),
                    ("?",) * 3,
                    str(getattr(val(node.args[0]), "dtype", "?")).replace("torch.", ""),
                    skipped="fused attention kernel: its GEMMs are not visible to the pass (run attention under "
                    "torch.nn.attention.sdpa_kernel(SDPBackend.MATH) to rewrite them)",
                )
            )
        elif node.target is CONV_BWD:
            rw.backward_conv(node, grads)
        elif is_grouped_mm(node) and node not in fwd:
            rw.backward_grouped(node, grads)
        elif is_opaque_grouped_mm(node):
            rw.records.append(GemmRecord(
                graph_index, node.name, "grouped_mm", "?", module_path(node), ("?",) * 3,
                str(getattr(val(node.args[0]), "dtype", "?")).replace("torch.", ""),
                skipped=f"{node.target.namespace}.{node.target.__name__}: a library's own grouped-GEMM op, its GEMMs "
                "not visible to the pass (transformers uses it where torch cannot compile torch._grouped_mm, "
                "e.g. in fp32: train in bf16 to have the experts' GEMMs rewritten)"))
    lower_gemms(graph, rw.records, config, rw.decompositions)
    if decompose:  # for Inductor: one seed buffer, not a kernel per draw
        merge_seed_draws(graph)
    graph.eliminate_dead_code()
    graph.lint()
    return rw.records

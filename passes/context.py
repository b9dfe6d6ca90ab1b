"""One joint graph's rewrite: what it reads, fixed when it starts, and the ledgers it writes."""
from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Callable, Mapping, Optional, Sequence

import torch.fx as fx

from .analysis import module_path, size_str, val
from .config import NMConfig
from .ends import ModelEnds
from .records import GemmRecord, NodeInfo
from .roles import GraphRoles, Role
from .splice import atomic, splice


@dataclasses.dataclass(frozen=True)
class RewriteContext:
    graph: fx.Graph
    config: NMConfig
    graph_index: int
    ends: Optional[ModelEnds]  # where the model's first and last layers are among the graph's inputs
    roles: GraphRoles  # each backward matmul's role and why, read before the rewrite
    partners: Mapping  # seq_nr -> the forward GEMM a backward GEMM differentiates
    grads: frozenset  # the nodes that depend on the incoming gradient
    decompositions: Mapping  # Inductor's, applied to inserted functions; empty for aot_eager
    # The ledgers. Their contents change; which objects they are does not.
    records: list = dataclasses.field(default_factory=list)  # one GemmRecord per GEMM, in the order decided
    quantized: dict = dataclasses.field(default_factory=dict)  # forward operand source -> (its quantized node,
    #                                                            the Transform)
    quantized_gemms: set = dataclasses.field(default_factory=set)  # forward GEMMs whose operands were quantized
    dense_layers: dict = dataclasses.field(default_factory=dict)  # forward GEMM -> why its layer stays dense

    def record(self, node: fx.Node, op: str, role: Role) -> GemmRecord:
        """A new record for ``node``, its shape unknown until the rewrite reads it."""
        out = val(node)
        dtype = (
            out[0].dtype
            if isinstance(out, (tuple, list)) and out and out[0] is not None
            else getattr(out, "dtype", None)
        )
        rec = GemmRecord(self.graph_index, node.name, op, role, module_path(node), ("?",) * 3,
                         str(dtype).replace("torch.", ""))
        self.records.append(rec)
        return rec

    @contextlib.contextmanager
    def transaction(self, *recs: GemmRecord):
        """One GEMM's rewrite, all or nothing: on any error its inserted nodes are erased, the ledgers
        restored, and its records say "not understood" (the pass never fails a user's compile)."""
        quantized, quantized_gemms = dict(self.quantized), set(self.quantized_gemms)
        try:
            with atomic(self.graph):
                yield
        except Exception as err:  # noqa: BLE001
            self.quantized.clear()
            self.quantized.update(quantized)
            self.quantized_gemms.clear()
            self.quantized_gemms.update(quantized_gemms)
            for rec in recs:
                rec.transforms.clear()
                rec.notes.clear()
                rec.skipped = f"not understood ({type(err).__name__}: {err})"

    def selected(self, rec: GemmRecord) -> bool:
        """Whether ``include`` and ``exclude`` leave the record's module to the rewrite; if not, says why."""
        cfg = self.config
        if cfg.include is not None and not re.search(cfg.include, rec.module):
            rec.skipped = f"module {rec.module!r} does not match include={cfg.include!r}"
            return False
        if cfg.exclude is not None and re.search(cfg.exclude, rec.module):
            rec.skipped = f"module {rec.module!r} matches exclude={cfg.exclude!r}"
            return False
        return True

    def splice(self, before: fx.Node, fn: Callable, inputs: Sequence[fx.Node], *, serves: fx.Node,
               info: NodeInfo) -> fx.Node:
        return splice(self.graph, before, fn, list(inputs), serves=serves, info=info,
                      decompositions=self.decompositions)


def sizes(shape: tuple) -> tuple:
    """A shape as records keep it: ints, symbolic sizes as text."""
    return tuple(size_str(s) for s in shape)

"""What the pass did to one GEMM: the unit of every report, table and export."""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

from nmcompile.kernels.catalog import OPS, OpSpec
from nmcompile.kernels.gemm import DENSE_USE, KernelUse


class Transform(str):
    """One nm op applied to a GEMM operand. Its value is the label reports print ("mvue 2:4 along K
    (tokens)", "luq4 smp2", "sawb4 W,X"); consumers read the typed fields instead: ``op`` (a name in
    ``kernels.catalog.OPS``), ``params`` (the op's parameters) and ``where`` (the dim it groups
    along, or the forward operands it quantizes)."""

    op: str
    params: dict
    where: str

    def __new__(cls, op: str, params: Mapping, where: str = "") -> "Transform":
        self = super().__new__(cls, OPS[op].transform_label(params, where))
        self.op, self.params, self.where = op, dict(params), where
        return self

    def __getnewargs__(self):  # copies and pickles rebuild it from its fields
        return self.op, self.params, self.where

    @property
    def spec(self) -> OpSpec:
        return OPS[self.op]

    def as_dict(self) -> dict:
        return {"op": self.op, "params": dict(self.params), "where": self.where}

    @classmethod
    def from_dict(cls, d: dict) -> "Transform":
        return cls(d["op"], d["params"], d.get("where", ""))


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    """What a node the pass inserted carries (``node.meta["nm"]``): written by the rewrite, the seed
    merge and the lowering; read by the CLI, the exports and the profiler."""

    op: tuple  # what it runs, in order: ("mvue",), ("mvue", "luq"), ... (gradient compression), ("sawb",),
    #            ("seeds",), ("gemm",), ("sawb_fp8",), ("dequantize",), ("saved_int8",)
    gemm: str = ""  # the GEMM node it serves (for seeds: the GEMMs whose draws were merged, comma-separated)
    module: str = ""  # that GEMM's module
    role: str = ""  # a passes.roles.Role ("" where it serves several)
    bits: Optional[int] = None  # SAWB bit width
    kernel: str = ""  # the native GEMM's kernel
    count: Optional[int] = None  # seeds: how many draws were merged

    def __post_init__(self) -> None:
        if not isinstance(self.op, tuple) or not self.op or not all(isinstance(o, str) for o in self.op):
            raise TypeError(f"NodeInfo.op must be a non-empty tuple of op names, got {self.op!r}")

    @property
    def label(self) -> str:
        """How tables print it: "mvue+luq"."""
        return "+".join(self.op)

    def write(self, node) -> None:
        node.meta["nm"] = self

    @staticmethod
    def read(node) -> Optional["NodeInfo"]:
        info = node.meta.get("nm")
        return info if isinstance(info, NodeInfo) else None


@dataclasses.dataclass
class GemmRecord:
    graph: int  # index of the joint graph in this compile (Dynamo may produce several)
    node: str  # name of the GEMM node in the joint graph
    op: str  # mm | bmm | addmm | conv
    role: str  # a passes.roles.Role (Role.UNKNOWN: unclassified); a str, as JSON holds it
    module: str  # qualified name of the nn.Module that owns it ("" at top level)
    shape: tuple  # (M, N, K) of the GEMM; str entries for symbolic sizes
    dtype: str
    transforms: list = dataclasses.field(default_factory=list)  # Transforms, in the order they apply
    skipped: Optional[str] = None  # why nothing was applied, when nothing was
    notes: list = dataclasses.field(default_factory=list)
    # the kernel that runs it: a str whose value is its label, "dense" (input dtype), "fp8 e4m3", "int8",
    # "2:4 cusparselt bf16", "2:4 cusparselt fp8", or on CPU "2:4 cpu bf16" / "2:4 cpu fp8"
    kernel: KernelUse = DENSE_USE
    kernel_note: Optional[str] = None  # why a rewritten GEMM stayed dense (or on a lesser kernel)
    cusparselt: Optional[int] = None  # torch.backends.cusparselt.version() where it was compiled
    role_why: str = ""  # how the graph showed the role
    # where the partitioned graphs were captured (nmcompile.kept): the saved tensors this backward GEMM's
    # non-gradient operand is made from, as {name, shape, dtype, bytes, module, what}
    kept: list = dataclasses.field(default_factory=list)

    @property
    def flops(self) -> Optional[int]:
        try:
            m, n, k = (int(s) for s in self.shape)
        except (TypeError, ValueError):
            return None
        return 2 * m * n * k

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["transforms"] = [str(t) for t in self.transforms]
        d["ops"] = [t.as_dict() for t in self.transforms if isinstance(t, Transform)]
        d["kernel"] = str(self.kernel)
        d["kernel_use"] = self.kernel.as_dict()
        d["shape"] = list(self.shape)
        d["flops"] = self.flops
        return d

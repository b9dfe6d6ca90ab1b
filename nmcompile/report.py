"""Report: what the nm pass did to every GEMM of a model, in human and machine (JSON) form."""
from __future__ import annotations

import dataclasses
import json
from typing import Optional

import torch

from nmcompile.graph_breaks import GraphBreak
from nmcompile.kernels.catalog import Kind, Stage
from nmcompile.kernels.gemm import KernelUse, kernel_for
from nmcompile.passes.records import GemmRecord, Transform
from nmcompile.passes.roles import ROLES, Role

# 2: each GEMM has kernel, kernel_note, cusparselt; 3: and the typed forms of its transforms ("ops")
# and kernel ("kernel_use"); 4: and the run's graph breaks; 5: each GEMM's role_why (and the roles act_lhs, act_rhs);
# 6: each backward GEMM's kept tensors, the report's other kept tensors and recomputed forward GEMMs ("kept",
# "recomputed"; empty where the partitioned graphs were not captured)
SCHEMA = "nmcompile.report/6"
# Older reports read with their transforms and kernel as labels only (shown, not modelled), and a
# version-1 report with kernel "dense".
_READS = ("nmcompile.report/1", "nmcompile.report/2", "nmcompile.report/3", "nmcompile.report/4", "nmcompile.report/5",
          SCHEMA)


@dataclasses.dataclass
class Report:
    gemms: list
    options: dict
    torch_version: str = torch.__version__
    graph_breaks: list = dataclasses.field(default_factory=list)  # GraphBreaks: what ran outside the graphs
    kept: list = dataclasses.field(default_factory=list)  # saved tensors no backward GEMM needs (nmcompile.kept.Kept)
    recomputed: list = dataclasses.field(default_factory=list)  # modules whose forward GEMM the backward runs again

    @property
    def backward(self) -> list:
        return [g for g in self.gemms if g.role != Role.FWD]

    @property
    def forward(self) -> list:
        return [g for g in self.gemms if g.role == Role.FWD]

    def find(self, module: Optional[str] = None, role: Optional[str] = None) -> list:
        return [g for g in self.gemms if (module is None or g.module == module) and (role is None or g.role == role)]

    def summary(self) -> dict:
        """Counts, and the share of backward-GEMM FLOPs whose gradient operand is sparse / 4-bit."""
        bwd = self.backward
        total = sum(g.flops or 0 for g in bwd)

        def share(kind: str, op: Optional[str] = None) -> float:
            hit = sum(g.flops or 0 for g in bwd
                      if any(t.spec.kind == kind and op in (None, t.op) for t in _typed(g.transforms)))
            return hit / total if total else 0.0

        return {
            "gemms": len(self.gemms),
            "backward_gemms": len(bwd),
            "rewritten": sum(1 for g in self.gemms if g.transforms),
            "skipped": sum(1 for g in self.gemms if g.skipped),
            "backward_flops": total,
            "sparse_flop_share": share("prune"),
            "luq_flop_share": share("quantize", "luq"),
            "quant_flop_share": share("quantize"),
            "native_flop_share": sum(g.flops or 0 for g in bwd if g.kernel.native) / total if total else 0.0,
            "graph_breaks": sum(b.count for b in self.graph_breaks),
        }

    def as_dict(self) -> dict:
        from nmcompile.version import __version__

        return {"schema": SCHEMA, "nmcompile": __version__, "torch": self.torch_version,
                "options": self.options, "summary": self.summary(),
                "gemms": [g.as_dict() for g in self.gemms],
                "graph_breaks": [b.as_dict() for b in self.graph_breaks],
                "kept": [k.as_dict() for k in self.kept], "recomputed": list(self.recomputed)}

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.as_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "Report":
        data = json.loads(text)
        if data.get("schema") not in _READS:
            raise ValueError(
                f"unsupported report schema {data.get('schema')!r}; this version reads {', '.join(map(repr, _READS))}"
            )
        fields = {f.name for f in dataclasses.fields(GemmRecord)}
        gemms = []
        for d in data["gemms"]:
            g = GemmRecord(**{k: v for k, v in d.items() if k in fields})
            g.shape, g.role = tuple(g.shape), ROLES.get(g.role, g.role)
            if d.get("ops") is not None and len(d["ops"]) == len(g.transforms):
                g.transforms = [Transform.from_dict(t) for t in d["ops"]]
            use = d.get("kernel_use")
            g.kernel = KernelUse(g.kernel, **use) if use else KernelUse.from_label(g.kernel)
            gemms.append(g)
        breaks = [GraphBreak(**b) for b in data.get("graph_breaks", [])]
        from nmcompile.kept import Kept

        kept = [Kept(**{**k, "shape": tuple(k["shape"])}) for k in data.get("kept", [])]
        return cls(gemms, data["options"], data["torch"], breaks, kept, data.get("recomputed", []))

    def __str__(self) -> str:
        lines = [f"nm report: {self.summary()['rewritten']} of {len(self.gemms)} GEMMs rewritten"]
        for g in self.gemms:
            what = ", ".join(g.transforms) if g.transforms else _unchanged(g)
            kernel = (
                f"  [{g.kernel}]" if g.kernel.native else (f"  [dense: {g.kernel_note}]" if g.kernel_note else "")
            )
            lines.append(
                f"  [{g.graph}] {g.module or '<top>':30s} {g.role:7s} {g.op:5s} "
                f"{'x'.join(map(str, g.shape)):>18s}  {what}{kernel}"
            )
            if g.role_why and not g.role.quantized:
                lines.append(f"{'':42s}{g.role}: {g.role_why}")  # the roles no default compresses say why
        if self.graph_breaks:
            lines.append(f"graph breaks ({sum(b.count for b in self.graph_breaks)}): what follows them runs eagerly, "
                         "its GEMMs uncompressed and not listed above, unless Dynamo resumes in a new graph")
            lines.extend(f"  {b}" for b in self.graph_breaks)
        return "\n".join(lines)


def kernel_cell(g: GemmRecord) -> str:
    """The kernel, in rich markup: native ones green, a fallback with its reason dimmed."""
    from rich.markup import escape

    if g.kernel.native:
        return f"[green]{escape(g.kernel)}[/green]" + (
            f" [dim]({escape(g.kernel_note)})[/dim]" if g.kernel_note else ""
        )
    return str(g.kernel) + (f" [dim]({escape(g.kernel_note)})[/dim]" if g.kernel_note else "")


def _unchanged(g: GemmRecord) -> str:
    return f"skipped: {g.skipped}" if g.skipped else "unchanged"


# -- the tensor-core speedup a GEMM could get --------------------------------------------------
def _typed(transforms) -> list:
    return [t for t in transforms if isinstance(t, Transform)]


def tensor_core_speedup(rec) -> tuple[float, str]:
    """The peak tensor-core speedup (vs dense bf16) of the kernel this GEMM's operands allow, and that
    kernel's name for it (``kernels.gemm.GemmKernel.tc_speedup``, ``tc_label``): a 2:4-structured
    gradient can run on sparse tensor cores; a GEMM whose *both* operands are quantized can run on FP8.
    Upper bounds on the math rate, not end-to-end speedups."""
    t = _typed(rec.transforms)
    sparse = any(x.spec.kind == Kind.PRUNE and x.spec.form(x.params).sparse24 for x in t)
    quantized = [x for x in t if x.spec.kind == Kind.QUANTIZE]
    if rec.role == Role.FWD:
        low_bit = any(x.where == "W,X" for x in quantized)
    else:
        stages = {x.spec.stage for x in quantized}
        low_bit = {Stage.GRADIENT, Stage.FORWARD} <= stages
    kernel = kernel_for(sparse24=sparse, float8=low_bit)
    return kernel.tc_speedup, kernel.tc_label


def _weighted_speedup(records) -> Optional[float]:
    total = sum(r.flops or 0 for r in records)
    if not total:
        return None
    return total / sum((r.flops or 0) / tensor_core_speedup(r)[0] for r in records)


def _flops(n: Optional[int]) -> str:
    if n is None:
        return "?"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def gemm_table(report, title: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col, kw in (("g", {"justify": "right"}), ("module", {}), ("role", {}), ("op", {}),
                    ("M×N×K", {"justify": "right"}), ("FLOPs", {"justify": "right"}),
                    ("transforms / skip reason", {}), ("kernel", {}), ("TC speedup", {"justify": "right"})):
        table.add_column(col, **kw)
    for r in report.gemms:
        if r.transforms:
            what = ", ".join(r.transforms)
        else:
            what = f"[dim]skipped: {r.skipped or 'nothing to do'}[/dim]"
        if r.notes:
            what += f" [yellow]({'; '.join(r.notes)})[/yellow]"
        if r.role_why:
            what += f"\n[dim]{r.role}: {r.role_why}[/dim]"
        speed, why = tensor_core_speedup(r)
        role_style = ROLES[r.role].style if r.role in ROLES else Role.UNKNOWN.style
        table.add_row(str(r.graph), r.module or "<top>", f"[{role_style}]{r.role}[/{role_style}]", r.op,
                      "×".join(map(str, r.shape)), _flops(r.flops), what, kernel_cell(r),
                      f"{speed:g}×" + (f" [dim]{why}[/dim]" if speed > 1 else ""))
    overall = _weighted_speedup(report.gemms)
    if overall is not None:
        table.add_section()
        table.add_row("", "[bold]all GEMMs[/bold]", "", "", "", _flops(sum(r.flops or 0 for r in report.gemms)),
                      "FLOP-weighted (Amdahl) over every GEMM", "", f"[bold]{overall:.2f}×[/bold]")
    return table


def graph_break_table(report, title: str):
    """The graph breaks of the run: where, Dynamo's reason and what it means for the GEMMs after it."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("where", "reason", "then", "×"):
        table.add_column(col, justify="right" if col == "×" else "left")
    for b in report.graph_breaks:
        where = escape(b.where) + (f"\n[dim]{escape(b.code)}[/dim]" if b.code else "")
        reason = f"[yellow]{escape(b.reason)}[/yellow]" + (f"\n[dim]{escape(b.detail)}[/dim]" if b.detail else "")
        then = ("[red]the whole function runs eagerly: its GEMMs are neither compressed nor reported[/red]" if b.eager
                else "a new graph starts after it (code Dynamo cannot trace runs eagerly in between)")
        table.add_row(where, reason, then, str(b.count))
    return table


def module_tree(report, label: str):
    from rich.tree import Tree

    root = Tree(f"[bold]{label}[/bold]")
    branches: dict = {(): root}
    for r in report.gemms:
        parts = tuple(p for p in (r.module or "").split(".") if p)
        for i in range(1, len(parts) + 1):
            if parts[:i] not in branches:
                branches[parts[:i]] = branches[parts[:i - 1]].add(f"[bold]{parts[i - 1]}[/bold]")
        what = ", ".join(r.transforms) if r.transforms else f"[dim]skipped: {r.skipped or 'nothing to do'}[/dim]"
        branches[parts].add(f"{r.role} {r.op} {'×'.join(map(str, r.shape))}: {what}")
    return root


def _bytes(n: int) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def kept_table(report, title: str):
    """What the backward keeps: per backward GEMM its saved tensors and their bytes, then the tensors only the
    elementwise backward reads; a tensor two GEMMs share is counted once in the total."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    kept_column = escape("kept (dtype[shape] from module.op)")
    for col, kw in (("g", {"justify": "right"}), ("for", {}), ("role", {}), (kept_column, {}),
                    ("bytes", {"justify": "right"})):
        table.add_column(col, **kw)
    counted: dict = {}

    def cell(kept) -> tuple[str, int]:
        text = escape(", ".join(f"{k['dtype']}[{'×'.join(map(str, k['shape']))}] from {k['module'] or '<top>'}."
                                f"{k['what']}" for k in kept))
        return text, sum(k["bytes"] for k in kept)

    for r in report.backward:
        if r.kept:
            text, total = cell(r.kept)
            counted.update({(r.graph, k["name"]): k["bytes"] for k in r.kept})
            role = r.role if r.role != Role.UNKNOWN else r.op  # a fused attention's backward: "sdpa"
            table.add_row(str(r.graph), r.module or "<top>", role, text, _bytes(total))
    if report.kept:
        text, total = cell([k.as_dict() for k in report.kept])
        counted.update({("other", k.name): k.bytes for k in report.kept})
        again = f"; recomputes the forward GEMMs of {', '.join(report.recomputed)}" if report.recomputed else ""
        table.add_row("", "[dim]elementwise backward[/dim]", "", text + again, _bytes(total))
    table.add_section()
    table.add_row("", "[bold]all saved tensors[/bold]", "", "", f"[bold]{_bytes(sum(counted.values()))}[/bold]")
    return table

"""Report: what the nm pass did to every GEMM of a model, in human and machine (JSON) form."""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Optional

import torch

from nmcompile.passes.records import GemmRecord

SCHEMA = "nmcompile.report/2"  # 2: each GEMM has kernel, kernel_note, cusparselt
_READS = ("nmcompile.report/1", SCHEMA)  # a version-1 report reads with kernel "dense"


@dataclasses.dataclass
class Report:
    gemms: list
    options: dict
    torch_version: str = torch.__version__

    @property
    def backward(self) -> list:
        return [g for g in self.gemms if g.role != "fwd"]

    @property
    def forward(self) -> list:
        return [g for g in self.gemms if g.role == "fwd"]

    def find(self, module: Optional[str] = None, role: Optional[str] = None) -> list:
        return [g for g in self.gemms if (module is None or g.module == module) and (role is None or g.role == role)]

    def summary(self) -> dict:
        """Counts, and the share of backward-GEMM FLOPs whose gradient operand is sparse / 4-bit."""
        bwd = self.backward
        total = sum(g.flops or 0 for g in bwd)

        def share(word: str) -> float:
            hit = sum(g.flops or 0 for g in bwd if any(t.startswith(word) for t in g.transforms))
            return hit / total if total else 0.0

        return {
            "gemms": len(self.gemms),
            "backward_gemms": len(bwd),
            "rewritten": sum(1 for g in self.gemms if g.transforms),
            "skipped": sum(1 for g in self.gemms if g.skipped),
            "backward_flops": total,
            "sparse_flop_share": share("mvue") + share("greedy"),
            "luq_flop_share": share("luq"),
            "native_flop_share": sum(g.flops or 0 for g in bwd if g.kernel != "dense") / total if total else 0.0,
        }

    def as_dict(self) -> dict:
        from nmcompile.version import __version__

        return {"schema": SCHEMA, "nmcompile": __version__, "torch": self.torch_version,
                "options": self.options, "summary": self.summary(),
                "gemms": [g.as_dict() for g in self.gemms]}

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
        gemms = [GemmRecord(**{k: v for k, v in g.items() if k in fields}) for g in data["gemms"]]
        for g in gemms:
            g.shape = tuple(g.shape)
        return cls(gemms, data["options"], data["torch"])

    def __str__(self) -> str:
        lines = [f"nm report: {self.summary()['rewritten']} of {len(self.gemms)} GEMMs rewritten"]
        for g in self.gemms:
            what = ", ".join(g.transforms) if g.transforms else _unchanged(g)
            kernel = (
                f"  [{g.kernel}]" if g.kernel != "dense" else (f"  [dense: {g.kernel_note}]" if g.kernel_note else "")
            )
            lines.append(
                f"  [{g.graph}] {g.module or '<top>':30s} {g.role:5s} {g.op:5s} "
                f"{'x'.join(map(str, g.shape)):>18s}  {what}{kernel}"
            )
        return "\n".join(lines)


def kernel_cell(g: GemmRecord) -> str:
    """The kernel, in rich markup: native ones green, a fallback with its reason dimmed."""
    from rich.markup import escape

    if g.kernel != "dense":
        return f"[green]{escape(g.kernel)}[/green]" + (
            f" [dim]({escape(g.kernel_note)})[/dim]" if g.kernel_note else ""
        )
    return "dense" + (f" [dim]({escape(g.kernel_note)})[/dim]" if g.kernel_note else "")


def _unchanged(g: GemmRecord) -> str:
    return f"skipped: {g.skipped}" if g.skipped else "unchanged"


# -- the tensor-core speedup a GEMM could get --------------------------------------------------
# Peak dense/sparse tensor-core throughput ratios of an H100 SXM (TFLOPS, without / with 2:4
# sparsity): BF16 989 / 1979, FP8 1979 / 3958. A GEMM whose one operand is 2:4-sparse along K can run
# on sparse tensor cores (2x the math); a GEMM whose *both* operands are 4-bit (LUQ levels / α and
# SAWB integers are exact in float8_e4m3fn) can run as an FP8 GEMM (2x bf16). Both: 4x. These are
# upper bounds on the math rate, not end-to-end speedups.
def _is_24(transform: str) -> bool:
    """An N:M transform whose result is 2:4-structured (1:2, 2:4, N <= 2 with 4 | M), as the lowering runs it."""
    m = re.match(r"(mvue|greedy) (\d+):(\d+)\b", transform)
    if not m:
        return False
    n, groups = int(m.group(2)), int(m.group(3))
    return (groups % 4 == 0 and n <= 2) or (groups == 2 and n == 1)


def tensor_core_speedup(rec) -> tuple[float, str]:
    t = rec.transforms
    sparse = any(_is_24(x) for x in t)
    if rec.role == "fwd":
        low_bit = any(x.startswith("sawb") and "W,X" in x for x in t)
    else:
        grad_low = any(x.startswith("luq") for x in t)
        other_low = any(x.startswith("sawb") for x in t)
        low_bit = grad_low and other_low
    speed = (2.0 if sparse else 1.0) * (2.0 if low_bit else 1.0)
    why = " + ".join(w for w, on in (("2:4 sparse TC", sparse), ("FP8 TC", low_bit)) if on)
    return speed, why or "dense bf16"


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
        speed, why = tensor_core_speedup(r)
        role_style = {"fwd": "cyan", "dgrad": "green", "wgrad": "magenta"}.get(r.role, "red")
        table.add_row(str(r.graph), r.module or "<top>", f"[{role_style}]{r.role}[/{role_style}]", r.op,
                      "×".join(map(str, r.shape)), _flops(r.flops), what, kernel_cell(r),
                      f"{speed:g}×" + (f" [dim]{why}[/dim]" if speed > 1 else ""))
    overall = _weighted_speedup(report.gemms)
    if overall is not None:
        table.add_section()
        table.add_row("", "[bold]all GEMMs[/bold]", "", "", "", _flops(sum(r.flops or 0 for r in report.gemms)),
                      "FLOP-weighted (Amdahl) over every GEMM", "", f"[bold]{overall:.2f}×[/bold]")
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

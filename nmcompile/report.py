"""Report: what the nm pass did to every GEMM of a model, in human and machine (JSON) form."""
from __future__ import annotations

import dataclasses
import json
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
        from nmcompile import __version__

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

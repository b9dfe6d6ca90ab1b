"""Graph breaks in the report: what Dynamo did not compile is named, with its reason and place, so GEMMs that
ran eagerly (uncompressed, unreported) do not pass unseen."""
import inspect
import json

import torch
import torch.nn as nn

import nmcompile
from nmcompile.report import Report

AOT = {"inner": "aot_eager"}


class LoopedExperts(nn.Module):
    """Experts as eager libraries write them: a loop over the experts that received tokens, found with
    data-dependent ops (``unique``, ``nonzero``)."""

    def __init__(self, d: int, experts: int):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(experts))

    def forward(self, x, choice, weight):
        out = torch.zeros_like(x)
        for e in choice.unique().tolist():  # data-dependent: Dynamo cannot trace the loop
            rows = (choice == e).nonzero()[:, 0]
            out[rows] = self.experts[e](x[rows]) * weight[rows, None]
        return out


class MoE(nn.Module):
    def __init__(self, d: int = 16, experts: int = 4):
        super().__init__()
        self.router, self.experts, self.out = nn.Linear(d, experts), LoopedExperts(d, experts), nn.Linear(d, d)

    def forward(self, x):
        weight, choice = self.router(x).softmax(-1).max(-1)
        return self.out(self.experts(x, choice, weight))


def make_moe():
    """The CLI's factory: (model, example inputs)."""
    torch.manual_seed(0)
    return MoE(), (torch.randn(32, 16),)


def _line(text: str) -> int:
    source, start = inspect.getsourcelines(LoopedExperts.forward)
    return start + next(i for i, line in enumerate(source) if text in line)


def test_a_data_dependent_loop_is_reported_with_its_place_and_reason():
    torch.manual_seed(0)
    report = nmcompile.explain(MoE(), torch.randn(32, 16), sparsity="2:4", **AOT)
    assert report.graph_breaks, "the loop over experts must show up as a graph break"
    first = report.graph_breaks[0]
    assert first.where.endswith(f"test_graph_breaks.py:{_line('choice.unique().tolist()')} in forward")
    assert "tolist" in first.code and first.reason and first.detail
    assert report.summary()["graph_breaks"] == sum(b.count for b in report.graph_breaks)
    assert any(b.eager for b in report.graph_breaks)  # Dynamo gave up on the experts' loop
    # the experts' GEMMs ran outside any graph the pass saw: only the router and the output layer are reported
    assert [g.op for g in report.forward] == ["addmm", "addmm"] and report.forward[0].module == "router"
    assert not any("experts" in g.module for g in report.gemms)
    text = str(report)
    assert "graph breaks (" in text and first.where in text


def test_graph_breaks_round_trip_through_json():
    report = nmcompile.explain(MoE(), torch.randn(32, 16), sparsity="2:4", **AOT)
    data = json.loads(report.to_json())
    assert data["schema"] == "nmcompile.report/6" and data["graph_breaks"]
    back = Report.from_json(report.to_json())
    assert back.graph_breaks == report.graph_breaks


def test_a_model_without_breaks_reports_none():
    report = nmcompile.explain(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)), torch.randn(8, 16),
                               sparsity="2:4", **AOT)
    assert report.graph_breaks == [] and report.summary()["graph_breaks"] == 0


def test_inspect_shows_the_graph_breaks():
    from tests.nmcompile.test_cli import run_cli

    result = run_cli("inspect", f"{__file__}:make_moe", "--graph", "none")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "graph break(s)" in out.splitlines()[0] and "Graph breaks (" in out
    assert "graph break in loop" in out and "runs eagerly" in out and f"test_graph_breaks.py:{_line('nonzero')}" in out

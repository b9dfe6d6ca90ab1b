"""The GEMM families: each node has at most one, and a name is registered once."""
from __future__ import annotations

import pytest
import torch

from nmcompile.passes import families, rewrite
from tests.models import MLP, ConvNet


def _joint_graph_nodes(model, x) -> list:
    graphs = []
    real = rewrite.rewrite_joint_graph

    def spy(graph, *args, **kwargs):
        graphs.append(graph)
        return real(graph, *args, **kwargs)

    torch._dynamo.reset()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("nmcompile.passes.joint_pass.rewrite_joint_graph", spy)
        torch.compile(model, backend="nm", options={"inner": "aot_eager"})(x).sum().backward()
    return [n for g in graphs for n in g.nodes if n.op == "call_function"]


@pytest.mark.parametrize("make", [lambda: (MLP((32, 64, 64, 16)), torch.randn(64, 32)),
                                  lambda: (ConvNet(), torch.randn(2, 3, 8, 8))])
def test_each_node_has_at_most_one_family_each_way(make):
    torch.manual_seed(0)
    nodes = _joint_graph_nodes(*make())
    seen = set()
    for node in nodes:
        fwd = [f.name for f in families.FAMILIES.values() if f.is_forward(node)]
        bwd = [f.name for f in families.FAMILIES.values() if f.is_backward(node)]
        assert len(fwd) <= 1 and len(bwd) <= 1, (node.format_node(), fwd, bwd)
        seen.update(fwd + bwd)
    assert seen, "the graphs hold GEMMs of some family"
    for u in rewrite.UNREWRITTEN:  # a target the pass leaves alone belongs to no family
        assert not any(u.matches(n) and families.backward_family(n) for n in nodes)


def test_a_family_name_is_registered_once():
    with pytest.raises(ValueError, match=r"'matmul' is already registered \(families: \[.*'conv'.*\]\)"):
        families.register(families.FAMILIES["matmul"])

"""How the nm ops reach Inductor: opaque calls of precompiled kernels, never math inlined per element.

Inlined into Inductor's kernels, MVUE's group math (water-filling caps, free sum, prefix bounds)
was recomputed for every output element of every consumer: the generated code grew by tens of
kilobytes per compressed GEMM and compile time by seconds per layer. These tests bound what the
pass adds to Inductor's output for a fixed graph (no timing): each nm op is one extern call, and
the code added per inserted op is a few wrapper lines, whatever the pattern and however many layers;
and the seeds of a whole graph come from one opaque draw, not from a small kernel per op.
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
from torch._inductor.utils import run_and_get_code

import nmcompile  # noqa: F401

OPTIONS = {
    "mvue 2:4 wgrad+dgrad, luq, sawb": {"sparsity": "2:4", "gemms": ["wgrad", "dgrad"], "quant": "luq",
                                        "fwd_quant": "sawb", "keep_first_last": False},
    "mvue 3:8": {"sparsity": "3:8"},
    "greedy 1:2 + luq smp 2": {"sparsity": "1:2", "method": "greedy", "quant": "luq", "smp": 2},
}
NM_CALL = re.compile(r"torch\.ops\.nm\.(\w+)\.default\(")
# A wrapper's extern call with its buffer bookkeeping (allocation, size/alignment asserts, dels),
# plus at most one kernel split where the call sits between two fusable neighbours. The inlined
# 2:4 math alone took over 20,000 characters per op.
CODE_PER_OP = 3000


def generated(depth: int, backend: str, options: dict | None) -> tuple[str, str]:
    torch._dynamo.reset()
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(32, 32), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(32, 16))
    f = torch.compile(model, backend=backend, options=options) if options else torch.compile(model, backend=backend)
    x = torch.randn(64, 32)
    with torch._inductor.config.patch(force_disable_caches=True):
        _, codes = run_and_get_code(lambda: f(x).pow(2).mean().backward())
    return codes[0], codes[-1]


@pytest.fixture(scope="module")
def inductor_code():
    return {depth: generated(depth, "inductor", None) for depth in (1, 3)}


@pytest.mark.parametrize("label", sorted(OPTIONS))
def test_nm_ops_are_extern_calls_with_bounded_code(label, inductor_code):
    options = OPTIONS[label]
    for depth in (1, 3):
        code = generated(depth, "nm", options)
        calls = [NM_CALL.findall(c) for c in code]
        total = sum(len(c) for c in calls)
        assert total > 0, "the pass inserted nm ops and Inductor calls them"
        if options.get("fwd_quant"):
            assert "sawb" in calls[0], "forward quantization runs in the forward graph"
        assert calls[-1], "gradient compression runs in the backward graph"
        added = sum(len(c) for c in code) - sum(len(c) for c in inductor_code[depth])
        assert added <= CODE_PER_OP * total, (
            f"{label}, {depth} hidden layers: {added} characters of generated code for {total} nm calls "
            f"(> {CODE_PER_OP} per call): is nm math being inlined into Inductor's kernels again?")
        for c in code:  # no kernel of Inductor's carries the nm math, or draws a seed
            kernels = re.findall(r"^cpp_fused_(\w+) = ", c, re.M)
            assert not any(k for k in kernels if re.search(r"mvue|greedy|luq|sawb|randint", k)), kernels
        seeds = [c.count("torch.ops.nm.seeds.default(") for c in code]
        assert seeds == [0, 1], f"one seed buffer for the backward graph, none in the forward: {seeds}"


def test_records_survive_a_compile_served_from_inductors_caches():
    """A cache hit skips the joint pass; while recording, the backend traces the graph once more."""
    from torch._dynamo.utils import counters

    from nmcompile.backend import recording

    model, x = nn.Linear(8, 4, bias=False), torch.randn(16, 8)
    seen = []
    for _ in range(2):
        torch._dynamo.reset()
        hits = counters["aot_autograd"]["autograd_cache_hit"] + counters["inductor"]["fxgraph_cache_hit"]
        with torch._inductor.config.patch(force_disable_caches=False), recording() as records:
            torch.compile(model, backend="nm", options={"sparsity": "2:4", "quant": "luq"})(x).sum().backward()
        seen.append([(r.role, r.transforms) for r in records])
    assert counters["aot_autograd"]["autograd_cache_hit"] + counters["inductor"]["fxgraph_cache_hit"] > hits, \
        "the second compile was not served from Inductor's caches"
    assert seen[0] == seen[1] and ("wgrad", ["mvue 2:4 along K (tokens)", "luq4"]) in seen[1], seen

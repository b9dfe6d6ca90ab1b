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
from nmcompile.kernels.catalog import OPS

OPTIONS = {
    "mvue 2:4 wgrad+dgrad, luq, sawb": {"sparsity": "2:4", "gemms": ["wgrad", "dgrad"], "quant": "luq",
                                        "fwd_quant": "sawb", "keep_first_last": False},
    "mvue 3:8": {"sparsity": "3:8"},
    "greedy 1:2 + luq smp 2": {"sparsity": "1:2", "method": "greedy", "quant": "luq", "smp": 2},
}
NM_CALL = re.compile(r"torch\.ops\.nm\.(\w+)\.default\(")
# a fused kernel is named after its ops, joined by "_": one named after an nm op (or a seed draw) carries its math
NM_MATH = re.compile(rf"(?:^|_)(?:{'|'.join([*OPS, 'randint'])})(?:_|\d|$)")
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
            assert any(c.startswith("sawb") for c in calls[0]), "forward quantization runs in the forward graph"
        assert calls[-1], "gradient compression runs in the backward graph"
        added = sum(len(c) for c in code) - sum(len(c) for c in inductor_code[depth])
        assert added <= CODE_PER_OP * total, (
            f"{label}, {depth} hidden layers: {added} characters of generated code for {total} nm calls "
            f"(> {CODE_PER_OP} per call): is nm math being inlined into Inductor's kernels again?")
        for c in code:  # no kernel of Inductor's carries the nm math, or draws a seed
            kernels = re.findall(r"^cpp_fused_(\w+) = ", c, re.M)
            assert not any(k for k in kernels if NM_MATH.search(k)), kernels
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


def test_without_the_cpu_kernels_the_ops_fall_back_to_the_torch_math(tmp_path):
    """No C++ compiler on PATH: one line says so, and the ops give the same bits."""
    import os
    import subprocess
    import sys

    script = (
        "import torch, nmcompile\n"
        "from nmcompile.kernels.sparsity import mvue_math\n"
        "from nmcompile.kernels.random import uniform\n"
        "x, s = torch.randn(16, 32), torch.tensor(7)\n"
        "a = torch.ops.nm.mvue(x, s, 2, 4, 1); b = torch.ops.nm.luq(x, s.view(1), 4, 'strict')\n"
        "assert torch.equal(a, mvue_math(x, uniform(s, (16, 8), 'cpu'), 2, 4, 1))\n"
        "print('OK')\n"
    )
    env = dict(os.environ, PATH=str(tmp_path), NMCOMPILE_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("CXX", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-2000:]
    assert proc.stderr.count("CPU kernels unavailable") == 1, proc.stderr[-2000:]
    assert "no C++ compiler found" in proc.stderr

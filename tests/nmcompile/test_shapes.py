"""Hard shapes and execution modes for the nm backend (docs/support.md).

The probe: a Linear layer fed with rows of the identity (x = I[:T]) and a loss (y·G).sum(), so the
neural gradient is exactly G and the weight gradient is W.grad = prune(Gᵀ)·I = prune(Gᵀ) padded
with zeros: the pruned operand of the wgrad GEMM is directly visible. Under
``fallback_random = True`` the compiled step draws its uniforms with eager ``torch.rand``, so it
must equal ``nmcompile.mvue(Gᵀ, dim=-1)`` drawn after the same ``torch.manual_seed`` exactly.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import nmcompile
from nmcompile.backend import recording

K, O = 16, 8  # in features (>= any token count used), out features


pytestmark = pytest.mark.usefixtures("fallback_random")  # compiled draws line up with eager ones


def probe_input(tokens: int, shape=None) -> torch.Tensor:
    x = torch.eye(K)[:tokens]
    return x if shape is None else x.reshape(*shape, K)


def groups_ok(pruned: torch.Tensor, n: int, m: int) -> bool:
    """At most n nonzeros in every full group of m along the last dim."""
    t = pruned.shape[-1] // m * m
    return bool(((pruned[..., :t].reshape(*pruned.shape[:-1], -1, m) != 0).sum(-1) <= n).all())


def run_probe(model: nn.Module, compiled, x: torch.Tensor, seed: int, G=None):
    """One compiled step; returns (W.grad, G) with G the incoming gradient."""
    gen = torch.Generator().manual_seed(1000 + seed)
    if G is None:
        G = torch.randn(*x.shape[:-1], O, generator=gen)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    (compiled(x) * G).sum().backward()
    return model.weight.grad.clone(), G


def expected_wgrad(G: torch.Tensor, seed: int, pattern="2:4", tokens=None) -> torch.Tensor:
    g = G.reshape(-1, O).t()  # [O, tokens]: the wgrad GEMM's gradient operand, grouped along tokens
    torch.manual_seed(seed)
    pruned = nmcompile.mvue(g, pattern, dim=-1)
    out = torch.zeros(O, K)
    out[:, : g.shape[1]] = pruned
    return out


def transformed(records, role="wgrad"):
    return [r for r in records if r.role == role and r.transforms]


@pytest.mark.parametrize("inner", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_dynamic_true_sizes_not_divisible_by_m(inner):
    model = nn.Linear(K, O)
    with recording() as records:
        compiled = torch.compile(model, backend="nm", dynamic=True, options={"sparsity": "2:4", "inner": inner})
        for seed, tokens in enumerate([8, 10, 13, 15]):
            wgrad, G = run_probe(model, compiled, probe_input(tokens), seed)
            assert torch.equal(wgrad, expected_wgrad(G, seed)), f"tokens={tokens}"
            assert groups_ok(wgrad[:, :tokens], 2, 4)
            rem = tokens % 4
            if rem:  # the trailing remainder along tokens stays dense
                assert torch.equal(wgrad[:, tokens - rem: tokens], G[tokens - rem:].t())
    compiles = [r for r in records if r.role == "fwd"]
    # aot_eager: one graph for every token count with >= 2 groups (a single group, M <= K < 2M,
    # adds a recompile: size-1 dims are specialized in contiguity checks). Inductor's decomposed
    # ops also specialize the remainder K mod M as 0, 1 or >= 2: at most three graphs.
    bound = 1 if inner == "aot_eager" else 3
    assert 1 <= len(compiles) <= bound, f"{len(compiles)} compiles for 4 token counts"
    recs = transformed(records)
    assert len(recs) == len(compiles)
    for rec in recs:
        assert rec.transforms == ["mvue 2:4 along K (tokens)"]
        assert any("symbolic" in note for note in rec.notes), rec.notes


def test_mark_dynamic_batch_and_sequence():
    model = nn.Linear(K, O)
    compiled = torch.compile(model, backend="nm", options={"sparsity": "1:2", "inner": "aot_eager"})
    with recording() as records:
        for seed, (b, s) in enumerate([(2, 4), (3, 3), (2, 7), (5, 3)]):
            x = probe_input(b * s, (b, s))
            torch._dynamo.mark_dynamic(x, 0)
            torch._dynamo.mark_dynamic(x, 1)
            wgrad, G = run_probe(model, compiled, x, seed)
            assert torch.equal(wgrad, expected_wgrad(G, seed, "1:2")), (b, s)
            assert groups_ok(wgrad[:, : b * s], 1, 2)
    assert len([r for r in records if r.role == "fwd"]) == 1, "marked-dynamic sizes recompiled"
    assert len(transformed(records)) == 1


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_non_contiguous_input(layout):
    model = nn.Linear(K, O)
    x = probe_input(12)
    if layout == "transposed":
        x = x.t().contiguous().t()
    else:  # every other row of a taller tensor
        tall = torch.zeros(24, K)
        tall[::2] = x
        x = tall[::2]
    assert not x.is_contiguous()
    compiled = torch.compile(model, backend="nm", options={"sparsity": "2:4", "inner": "aot_eager"})
    wgrad, G = run_probe(model, compiled, x, seed=3)
    assert torch.equal(wgrad, expected_wgrad(G, 3))


def test_conv_channels_last_wgrad():
    """Conv wgrad groups along W (tokens); compare with convolution_backward on the pruned dY."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 5, 8).to(memory_format=torch.channels_last)
    G = torch.randn(2, 4, 5, 8).to(memory_format=torch.channels_last)
    compiled = torch.compile(conv, backend="nm", options={"sparsity": "2:4", "inner": "aot_eager"})
    with recording() as records:
        torch.manual_seed(7)
        (compiled(x) * G).sum().backward()
    torch.manual_seed(7)
    pruned = nmcompile.mvue(G, "2:4", dim=3)
    assert groups_ok(pruned, 2, 4)
    expected = torch.nn.grad.conv2d_weight(x, conv.weight.shape, pruned, padding=1)
    torch.testing.assert_close(conv.weight.grad, expected, rtol=1e-5, atol=1e-5)
    dense = torch.nn.grad.conv2d_weight(x, conv.weight.shape, G, padding=1)
    assert not torch.allclose(conv.weight.grad, dense)
    (rec,) = transformed(records)
    assert rec.op == "conv" and "along W (tokens)" in rec.transforms[0]


def test_tiny_gemm_is_skipped_and_reported():
    model = nn.Linear(K, O)
    compiled = torch.compile(model, backend="nm", options={"sparsity": "2:4", "inner": "aot_eager"})
    x = probe_input(3)  # 3 tokens < M = 4: nothing to group
    with recording() as records:
        wgrad, G = run_probe(model, compiled, x, seed=0)
    expected = torch.zeros(O, K)
    expected[:, :3] = G.t()
    assert torch.equal(wgrad, expected), "a GEMM too small to group must stay dense"
    (rec,) = [r for r in records if r.role == "wgrad"]
    assert not rec.transforms and any("< M=4" in n for n in rec.notes), rec


class TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(K, O), nn.Linear(K, O)

    def forward(self, x):
        ya = self.a(x)
        torch._dynamo.graph_break()
        return ya + self.b(x)


def test_graph_break_rewrites_every_graph():
    model = TwoBranches()
    compiled = torch.compile(model, backend="nm", options={"sparsity": "2:4", "inner": "aot_eager"})
    x = probe_input(12)
    G = torch.randn(12, O)
    with recording() as records:
        torch.manual_seed(0)
        (compiled(x) * G).sum().backward()
    assert len([r for r in records if r.role == "fwd"]) == 2, "expected two graphs around the break"
    modules = sorted(r.module for r in transformed(records))
    assert modules == ["a", "b"], modules
    for lin in (model.a, model.b):  # both weight gradients are pruned copies of Gᵀ
        g = lin.weight.grad[:, :12]
        assert groups_ok(g, 2, 4)
        assert not torch.equal(g, G.t())
        # kept entries are G/p, with p ≤ 1: same sign, at least as large
        nz = g != 0
        assert (torch.sign(g[nz]) == torch.sign(G.t()[nz])).all()
        assert (g[nz].abs() >= G.t()[nz].abs() * (1 - 1e-6)).all()


def test_model_without_gemms():
    def f(x, w):
        return (torch.tanh(x) * w).sum(-1)

    x, w = torch.randn(6, 8), torch.randn(8, requires_grad=True)
    compiled = torch.compile(f, backend="nm", options={"sparsity": "2:4", "quant": "luq"})
    with recording() as records:
        compiled(x, w).sum().backward()
    got = w.grad.clone()
    w.grad = None
    f(x, w).sum().backward()
    torch.testing.assert_close(got, w.grad)
    assert records == [], "no GEMM, nothing recorded"


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_inference_graphs_untouched(context):
    model = nn.Sequential(nn.Linear(K, 32), nn.ReLU(), nn.Linear(32, O))
    x = torch.randn(12, K)
    compiled = torch.compile(model, backend="nm", options={"sparsity": "2:4", "fwd_quant": "sawb",
                                                             "keep_first_last": False, "inner": "aot_eager"})
    with recording() as records, context():
        torch.manual_seed(0)
        out = compiled(x)
    assert records == [], "inference graphs must not be rewritten"
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))


class Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(K, O)
        self.weight = self.lin.weight

    def forward(self, x):
        return checkpoint(lambda t: self.lin(t) * 1.0, x, use_reentrant=False)


def test_activation_checkpointing():
    model = Checkpointed()
    compiled = torch.compile(model, backend="nm", options={"sparsity": "2:4", "inner": "aot_eager"})
    with recording() as records:
        for seed in (0, 1):
            model.lin.zero_grad(set_to_none=True)
            x = probe_input(12)
            G = torch.randn(12, O, generator=torch.Generator().manual_seed(seed))
            torch.manual_seed(seed)
            (compiled(x) * G).sum().backward()
            assert torch.equal(model.lin.weight.grad, expected_wgrad(G, seed))
    (rec,) = transformed(records)
    assert rec.module == "lin", rec

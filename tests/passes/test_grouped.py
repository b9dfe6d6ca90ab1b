"""Grouped (expert) GEMMs: ``torch._grouped_mm``'s backward rewritten, N:M groups within each expert's tokens."""
import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import nmcompile
from nmcompile.backend import aot_eager
from nmcompile.kernels import reference as ref
from nmcompile.kernels.catalog import OPS
from nmcompile.passes.config import NMConfig
from nmcompile.passes.joint_pass import NMJointPass
from nmcompile.passes.grouped import GROUPED_MM, within_experts
from tests.conftest import heavy_tailed
from tests.kernels.stats import max_z, variance_z

pytestmark = pytest.mark.skipif(GROUPED_MM is None, reason="this torch has no torch._grouped_mm")

# expert 1 gets no token, expert 0 fewer than M, experts 2 and 3 a partial last group; 2 rows past offs[-1]
OFFS = torch.tensor([3, 3, 14, 21], dtype=torch.int32)
TOKENS = 23


def _padded_segments(x: torch.Tensor, m: int) -> list:
    """Each expert's tokens (rows of ``x``), zero-padded to a multiple of ``m``, and the rows past offs[-1]."""
    bounds = [0, *OFFS.tolist(), x.shape[0]]
    out = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        seg = x[start:end]
        pad = -seg.shape[0] % m
        out.append(torch.cat([seg, seg.new_zeros(pad, *seg.shape[1:])]) if pad else seg)
    return out


@pytest.mark.parametrize("n,m", [(2, 4), (1, 2)])
def test_within_experts_keeps_n_of_every_m_of_each_experts_tokens(n, m):
    x = heavy_tailed(TOKENS, 16, seed=3)
    prune = within_experts(lambda p: OPS["mvue"].apply(p, n=n, m=m, dim=0), m, 0)
    y = prune(x, OFFS)
    assert y.shape == x.shape
    for seg, xs in zip(_padded_segments(y, m), _padded_segments(x, m)):
        if seg.shape[0]:
            groups = seg.reshape(-1, m, seg.shape[1])  # groups start at the expert's first token
            assert ((groups != 0).sum(1) <= n).all()
            assert (((groups != 0).sum(1) == n) | ((xs.reshape(-1, m, xs.shape[1]) != 0).sum(1) < n)).all()


def _groups(x: torch.Tensor, m: int) -> torch.Tensor:
    """[..., T, C] -> [..., C·groups, M]: every column's groups of M tokens, counted from each expert's first."""
    segs = _padded_segments(x.movedim(-2, 0), m)
    return torch.cat([seg.movedim(0, -1).reshape(*seg.shape[1:], -1, m).flatten(-3, -2)
                      for seg in segs if seg.shape[0]], dim=-2)


def test_within_experts_is_unbiased_with_the_exact_mvue_variance():
    """Independent columns are independent draws: 4000 copies of each column in one call."""
    n, m, draws = 2, 4, 4000
    x = heavy_tailed(TOKENS, 6, seed=4)
    prune = within_experts(lambda p: OPS["mvue"].apply(p, n=n, m=m, dim=0), m, 0)
    samples = prune(x.repeat(1, draws), OFFS).reshape(TOKENS, draws, 6).movedim(1, 0)  # [draws, T, 6]
    groups = _groups(x, m)
    exact = ref.mvue_variance(groups, n)
    drawn = _groups(samples, m)
    assert max_z(drawn, groups, exact) < 5
    assert variance_z(drawn, exact.sum(-1)) < 5


class Experts(nn.Module):
    """A top-1 mixture of experts as grouped GEMMs (tokens sorted by expert, int32 end offsets)."""

    def __init__(self, experts: int = 4, d: int = 16, hidden: int = 32):
        super().__init__()
        self.router = nn.Linear(d, experts)
        self.up = nn.Parameter(torch.randn(experts, hidden, d) / d ** 0.5)
        self.down = nn.Parameter(torch.randn(experts, d, hidden) / hidden ** 0.5)

    def forward(self, x):
        weight, choice = self.router(x).softmax(-1).max(-1)
        ids, order = torch.sort(choice)
        counts = torch.histc(ids.float(), bins=self.up.shape[0], min=0, max=self.up.shape[0] - 1)
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        h = torch._grouped_mm(x[order], self.up.transpose(-2, -1), offs=offs).relu()
        y = torch._grouped_mm(h, self.down.transpose(-2, -1), offs=offs) * weight[order, None]
        return torch.zeros_like(y).index_copy(0, order, y)


def _model():
    torch.manual_seed(0)
    return Experts().bfloat16(), torch.randn(40, 16, dtype=torch.bfloat16)  # the grouped GEMM compiles in bf16


def test_records_name_the_expert_gemms_and_what_was_done():
    model, x = _model()
    r = nmcompile.explain(model, x, sparsity="2:4", quant="luq", fwd_quant="sawb", keep_first_last=False,
                          inner="aot_eager")
    grouped = [g for g in r.gemms if g.op == "grouped_mm"]
    assert [g.role for g in grouped] == ["fwd", "fwd", "wgrad", "dgrad", "wgrad"]
    for g in grouped[:2]:
        assert "grouped (expert) GEMMs is not implemented" in g.skipped
    for g in (grouped[2], grouped[4]):
        assert [str(t) for t in g.transforms] == ["mvue 2:4 along K (tokens, per expert)", "luq4"]
        assert "each of the 4 experts' first token" in g.notes[0]
        assert g.shape[2] == 40  # K: all tokens, each expert reducing over its own
    assert [str(t) for t in grouped[3].transforms] == ["luq4"]  # K = 32 hidden features... of the down GEMM
    assert "no native kernel for grouped_mm" in grouped[2].kernel_note


def test_the_wgrad_receives_a_gradient_pruned_within_each_expert():
    """The gradient operand as the wgrad grouped GEMM gets it: at most 2 nonzeros in every group of 4 of an
    expert's tokens, groups counted from the expert's first token."""
    model, x = _model()
    seen = []

    class Spy(fx.Interpreter):
        def call_function(self, target, args, kwargs):
            if target is GROUPED_MM and args[0].dim() == 2 and args[1].dim() == 2:
                seen.append((args[0], args[1], args[2] if len(args) > 2 else kwargs["offs"]))
            return super().call_function(target, args, kwargs)

    def backend(gm, example_inputs):
        joint = NMJointPass(NMConfig(sparsity="2:4"), decompose=False)
        return aot_eager(gm, example_inputs, joint,
                         on_graph=lambda g, kind: (lambda *a: Spy(g).run(*a)) if kind == "backward" else None)

    torch.compile(model, backend=backend)(x).float().pow(2).sum().backward()
    assert len(seen) == 2
    for a, b, offs in seen:
        grad = a.T if a.shape[1] == x.shape[0] else b  # the operand whose token dim is dim 0 after this
        bounds = [0, *offs.tolist()]
        for start, end in zip(bounds[:-1], bounds[1:]):
            seg = grad[start:end].float()
            seg = torch.cat([seg, seg.new_zeros(-seg.shape[0] % 4, seg.shape[1])])
            assert ((seg.reshape(-1, 4, seg.shape[1]) != 0).sum(1) <= 2).all()


def test_dense_options_leave_the_grouped_gradients_exact():
    model, x = _model()
    eager = torch.autograd.grad(model(x).float().pow(2).sum(), list(model.parameters()))
    compiled = torch.compile(model, backend="nm", options={"quant": "luq", "include": "nothing", "inner": "aot_eager"})
    got = torch.autograd.grad(compiled(x).float().pow(2).sum(), list(model.parameters()))
    for e, g in zip(eager, got):
        torch.testing.assert_close(g, e, rtol=0, atol=0)

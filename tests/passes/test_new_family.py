"""The next GEMM family in miniature: a library's own GEMM op (``nmtest::gemm``, with its own backward formula in
the same op) becomes rewritable by this one module and nothing else in the tree. It registers a ``GemmFamily``
whose backward decides the role of each of its backward GEMMs and compresses the gradient operand along the
reduction with the pass's shared compression; the records, the options and the lowering need no change."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

from nmcompile.passes import families
from nmcompile.passes.analysis import val
from nmcompile.passes.compress import compress, gradient_steps, why_unchanged
from nmcompile.passes.context import RewriteContext, sizes
from nmcompile.passes.roles import Role

import nmcompile


@torch.library.custom_op("nmtest::gemm", mutates_args=())
def gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a @ b


@gemm.register_fake
def _(a, b):
    return a.new_empty(a.shape[0], b.shape[1])


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _gemm_backward(ctx, g):
    a, b = ctx.saved_tensors
    return torch.ops.nmtest.gemm(g, b.t()), torch.ops.nmtest.gemm(a.t(), g)  # dA = g·Bᵀ, dB = Aᵀ·g


gemm.register_autograd(_gemm_backward, setup_context=_setup)


def _is_gemm(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.nmtest.gemm.default


def _backward(ctx: RewriteContext, node: fx.Node) -> None:
    a, b = node.args
    rec = ctx.record(node, "nmtest_gemm", Role.UNKNOWN)
    with ctx.transaction(rec):
        rec.shape = sizes((val(a).shape[0], val(b).shape[1], val(a).shape[1]))
        if (a in ctx.grads) == (b in ctx.grads):
            rec.skipped = "not one gradient operand"
            return
        # its own backward formula says which is which: g·Bᵀ reduces over features, Aᵀ·g over tokens
        role, grad, dim = (Role.DGRAD, a, 1) if a in ctx.grads else (Role.WGRAD, b, 0)
        rec.role, rec.role_why = role, "nmtest::gemm's backward formula"
        if not ctx.selected(rec):
            return
        steps = gradient_steps(ctx, rec, role, val(grad).shape[dim], dim, role.reduces)
        if not steps:
            rec.skipped = why_unchanged(ctx.config, role)
            return
        node.replace_input_with(grad, compress(ctx, grad, node, steps, role))


FAMILY = families.GemmFamily(
    "nmtest_gemm", label=lambda node: "nmtest_gemm", is_forward=_is_gemm, is_backward=_is_gemm,
    layer_operands=lambda node: tuple(node.args[:2]), backward=_backward,
    forward=lambda node: families.ForwardGemm((val(node.args[0]).shape[0], val(node.args[1]).shape[1],
                                               val(node.args[0]).shape[1]),
                                              unsupported="is not implemented for nmtest::gemm's forward"),
)


@pytest.fixture
def family():
    families.register(FAMILY)
    yield FAMILY
    del families.FAMILIES[FAMILY.name]


class Layer(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out) / d_in**0.5)

    def forward(self, x):
        return torch.ops.nmtest.gemm(x, self.weight)


def _run(options: dict):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), Layer(32, 32), nn.Linear(32, 8))
    x = torch.randn(64, 16)
    torch._dynamo.reset()
    with nmcompile.backend.recording() as records:
        torch.compile(model, backend="nm", options={"inner": "aot_eager", "keep_first_last": False, **options})(
            x).square().sum().backward()
    return [r for r in records if r.op == "nmtest_gemm"], model[1].weight.grad


def test_a_registered_family_is_rewritten_like_the_builtin_ones(family):
    dense = _run({})[1]
    records, grad = _run({"sparsity": "2:4"})  # the default gemms: the update GEMMs only
    by_role = {r.role: r for r in records}
    assert set(by_role) == {Role.FWD, Role.WGRAD, Role.DGRAD}, records
    assert by_role[Role.WGRAD].transforms == ["mvue 2:4 along K (tokens)"]
    assert by_role[Role.DGRAD].skipped == "dgrad not in gemms=['wgrad'] and no quant set"
    assert by_role[Role.WGRAD].shape == (32, 32, 64) and not by_role[Role.FWD].transforms
    assert not torch.equal(grad, dense)  # the pruned gradient reached the weight's update


def test_its_gradients_are_quantized_where_the_options_say(family):
    records, _ = _run({"quant": "luq", "fwd_quant": "sawb"})
    by_role = {r.role: r for r in records}
    assert by_role[Role.WGRAD].transforms == by_role[Role.DGRAD].transforms == ["luq4"]
    assert by_role[Role.FWD].skipped == "sawb is not implemented for nmtest::gemm's forward"


def test_without_the_family_the_op_is_left_alone():
    records, grad = _run({"sparsity": "2:4"})
    assert records == [] and torch.equal(grad, _run({})[1])

"""The compiled graphs compute what an eager reference applying the same ops computes."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nmcompile
from nmcompile.backend import recording
from tests.models import MLP, ConvNet


# Eager RNG in graph order: random ops fall back to torch's generator, and the scheduler keeps the
# nodes in order (reordering for peak memory may move the small seed draws of independent GEMMs).
EAGER_RNG = {"fallback_random": True, "force_disable_caches": True, "reorder_for_peak_memory": False,
             "reorder_for_locality": False}


def compress(g, role, opts, dim):
    """The eager transforms the pass applies to a gradient operand, in the pass's RNG order."""
    if opts.get("sparsity") and role in opts.get("gemms", ["wgrad"]):
        fn = nmcompile.mvue if opts.get("method", "mvue") == "mvue" else nmcompile.greedy
        g = fn(g, opts["sparsity"], dim=dim)
    if opts.get("quant") == "luq":
        g = nmcompile.luq(g, bits=opts.get("bits", 4), samples=opts.get("smp", 1))
    return g


class RefLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, opts):
        ctx.save_for_backward(x, w)
        ctx.opts = opts
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            dx = compress(g, "dgrad", ctx.opts, dim=1) @ w
        dw = compress(g.t(), "wgrad", ctx.opts, dim=1) @ x
        return dx, dw, g.sum(0), None


def reference_grads(model, x, opts):
    h = x
    for i, fc in enumerate((model.fc1, model.fc2, model.fc3)):
        h = RefLinearFn.apply(h, fc.weight, fc.bias, opts)
        h = torch.relu(h) if i < 2 else h
    h.sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def compiled_grads(model, x, opts):
    f = torch.compile(model, backend="nm", options=dict(opts))
    f(x).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("opts", [
    {"sparsity": "2:4"},
    {"sparsity": "1:2", "gemms": ["wgrad", "dgrad"], "quant": "luq", "smp": 2},
])
def test_compiled_equals_eager_reference_under_fallback_random(opts):
    model, x = MLP(), torch.randn(48, 32)
    torch.manual_seed(1)
    want = reference_grads(model, x, opts)
    model.zero_grad()
    with torch._inductor.config.patch(**EAGER_RNG):
        torch.manual_seed(1)
        got = compiled_grads(model, x, opts)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    # and the transforms really acted: the dense gradients differ
    model.zero_grad()
    model(x).sum().backward()
    assert not torch.allclose(model.fc1.weight.grad, want["fc1.weight"], rtol=1e-3)


def test_conv_compiled_equals_eager_reference():
    model, x = ConvNet(), torch.randn(2, 3, 8, 8)
    opts = {"sparsity": "2:4", "gemms": ["wgrad", "dgrad"]}
    with torch._inductor.config.patch(**EAGER_RNG):
        torch.manual_seed(3)
        got = compiled_grads(model, x, opts)
    # eager: the head is an nn.Linear, the convs use the grad functions of torch.nn.grad
    model.zero_grad()
    torch.manual_seed(3)
    a1 = model.conv1(x)
    h1 = torch.relu(a1)
    a2 = model.conv2(h1)
    h2 = torch.relu(a2)
    pooled = h2.mean((2, 3)).detach().requires_grad_()
    out = RefLinearFn.apply(pooled, model.head.weight, model.head.bias, opts)
    out.sum().backward()
    g2 = torch.autograd.grad(h2.mean((2, 3)), a2, pooled.grad)[0]

    def conv_grads(conv, inp, g):
        gd = compress(g, "dgrad", opts, dim=1)
        dinp = torch.nn.grad.conv2d_input(inp.shape, conv.weight, gd, padding=1)
        gw = compress(g, "wgrad", opts, dim=3)
        return dinp, torch.nn.grad.conv2d_weight(inp, conv.weight.shape, gw, padding=1), g.sum((0, 2, 3))

    dh1, dw2, db2 = conv_grads(model.conv2, h1, g2)
    g1 = dh1 * (a1 > 0)
    gw1 = compress(g1, "wgrad", opts, dim=3)  # conv1's input needs no grad: wgrad only
    dw1 = torch.nn.grad.conv2d_weight(x, model.conv1.weight.shape, gw1, padding=1)
    torch.testing.assert_close(got["conv2.weight"], dw2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["conv2.bias"], db2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["conv1.weight"], dw1, rtol=1e-4, atol=1e-5)


def test_average_of_compiled_weight_gradients_converges_to_dense():
    """Unbiased end to end: the mean of many MVUE weight gradients is within 5 standard errors of
    the dense gradient (standard error from the spread of the draws); greedy's mean is not."""
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(64, 32)
    model(x).sum().backward()
    dense = model.fc1.weight.grad.clone()

    def draws(method, count):
        f = torch.compile(model, backend="nm", options={"sparsity": "2:4", "method": method})
        out = []
        for _ in range(count):
            model.zero_grad()
            f(x).sum().backward()
            out.append(model.fc1.weight.grad.clone())
        return torch.stack(out).double()

    mvue = draws("mvue", 200)
    se = mvue.std(0) / 200**0.5
    z = ((mvue.mean(0) - dense) / se.clamp_min(1e-12)).abs()
    assert z.max() < 5.5 and (mvue.std(0) > 0).all()  # 5.5: max over 2048 entries
    greedy = draws("greedy", 3)
    assert (((greedy.mean(0) - dense).abs() / se.clamp_min(1e-12)) > 5.5).float().mean() > 0.5


def test_inference_graphs_are_untouched():
    model = MLP()
    with recording() as records, torch.no_grad():
        torch.compile(model, backend="nm", options={"sparsity": "2:4"})(torch.randn(8, 32))
    assert records == []
    with recording() as records, torch.inference_mode():
        torch.compile(model, backend="nm", options={"sparsity": "2:4"})(torch.randn(8, 32))
    assert records == []


def test_two_option_sets_never_share_compiled_code():
    """Same model, same inputs, two option sets in one process: each compile runs with its own
    options, and the gradient itself shows it. With x = I the weight gradient is the pruned incoming
    gradient Gᵀ, grouped along tokens: 1:2 keeps one of every pair, 2:4 keeps two of every four."""
    model = nn.Linear(16, 4, bias=False)
    x, G = torch.eye(16), torch.randn(16, 4, generator=torch.Generator().manual_seed(3))
    seen, grads = {}, {}
    for pattern in ("2:4", "1:2"):
        with recording() as records:
            f = torch.compile(model, backend="nm", options={"sparsity": pattern})
            model.zero_grad()
            (f(x) * G).sum().backward()
        seen[pattern] = records[-1].transforms
        grads[pattern] = model.weight.grad.clone()
    assert seen == {"2:4": ["mvue 2:4 along K (tokens)"], "1:2": ["mvue 1:2 along K (tokens)"]}
    pairs = (grads["1:2"].reshape(4, 8, 2) != 0).sum(-1)
    assert pairs.max() == 1, "1:2 code ran for the 1:2 compile"
    quads = (grads["2:4"].reshape(4, 4, 4) != 0).sum(-1)
    assert quads.max() == 2 and (grads["2:4"].reshape(4, 8, 2) != 0).sum(-1).max() == 2, "2:4 code, not 1:2"



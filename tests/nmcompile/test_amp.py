"""Mixed precision: bf16 autocast, fp16 autocast with ``torch.amp.GradScaler("cpu")``.

On torch 2.13 CPU, fp16 autocast and ``GradScaler("cpu")`` are both available, so the fp16 tests
run the real AMP loop. GradScaler skips a step only if it sees a NaN/Inf in some gradient; the nm
ops must therefore carry non-finite gradients through (docs/support.md, "Non-finite values"): MVUE/greedy return a group
holding one unchanged, LUQ/SAWB make the whole tensor non-finite. The models have no biases, so
every path from the loss to a parameter goes through a rewritten backward GEMM: if an nm op
swallowed the non-finite value, the gradients would be finite and the scaler would take the step.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import nmcompile
from nmcompile.backend import recording

K, H, O, T = 16, 32, 8, 12

RECIPES = {
    "mvue": {"sparsity": "2:4"},
    "greedy": {"sparsity": "2:4", "method": "greedy"},
    "luq": {"quant": "luq"},
    "mvue+luq both": {"sparsity": "1:2", "quant": "luq", "gemms": ["wgrad", "dgrad"]},
    "sawb+mvue": {"sparsity": "2:4", "fwd_quant": "sawb", "keep_first_last": False},
}


pytestmark = pytest.mark.usefixtures("fallback_random")  # compiled draws line up with eager ones


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(K, H, bias=False), nn.ReLU(), nn.Linear(H, O, bias=False))


def test_bf16_autocast_wgrad_is_pruned_bf16_gradient():
    """Under bf16 autocast the GEMMs run in bf16: the pass sees bf16 operands and the weight
    gradient of x = I is exactly the MVUE-pruned bf16 incoming gradient."""
    lin = nn.Linear(K, O)
    compiled = torch.compile(lin, backend="nm", options={"sparsity": "2:4", "inner": "aot_eager"})
    x = torch.eye(K)[:T]
    G = torch.randn(T, O, generator=torch.Generator().manual_seed(1))
    with recording() as records:
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = compiled(x)
        assert y.dtype == torch.bfloat16
        (y * G).sum().backward()
    torch.manual_seed(5)
    expected = nmcompile.mvue(G.bfloat16().t(), "2:4", dim=-1).float()
    assert torch.equal(lin.weight.grad[:, :T], expected)
    assert torch.equal(lin.weight.grad[:, T:], torch.zeros(O, K - T))
    (rec,) = [r for r in records if r.role == "wgrad"]
    assert rec.dtype == "bfloat16" and rec.transforms


def bf16_steps(options: dict) -> list:
    """The weight updates of two compiled bf16-autocast SGD steps (same data, same seeds)."""
    torch._dynamo.reset()
    model = mlp()
    start = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    compiled = torch.compile(model, backend="nm", options=options)
    x = torch.randn(T, K, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(11)
    for _ in range(2):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = compiled(x).float().pow(2).mean()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
    return [p.detach() - p0 for p, p0 in zip(model.parameters(), start)]


def test_bf16_autocast_training_step_under_inductor_matches_aot_eager():
    """Two bf16-autocast steps with LUQ and 2:4 on the backward GEMMs: Inductor's updates equal the
    same steps run eagerly (inner='aot_eager', same draws) up to bf16 rounding, far closer than the
    updates of dense training are to them (the control that makes the comparison mean something)."""
    nm = {"quant": "luq", "sparsity": "2:4"}
    inductor, eager = bf16_steps({**nm, "inner": "inductor"}), bf16_steps({**nm, "inner": "aot_eager"})
    dense = bf16_steps({"inner": "aot_eager"})
    for a, b, d in zip(inductor, eager, dense):
        assert b.norm() > 0, "the weights moved"
        gap, control = (a - b).norm() / b.norm(), (d - b).norm() / b.norm()
        assert gap < 0.05 and control > 4 * gap, (float(gap), float(control))


def scaler_step(model, compiled, scaler, opt, x, G):
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        y = compiled(x)
    loss = (y.float() * G).sum()
    scaler.scale(loss).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    stepped = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    return grads, stepped, scale, scaler.get_scale()


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_fp16_grad_scaler_skips_non_finite_gradients(recipe):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    compiled = torch.compile(model, backend="nm", options={**RECIPES[recipe], "inner": "aot_eager"})
    x = torch.randn(T, K, generator=torch.Generator().manual_seed(3))
    G = torch.randn(T, O, generator=torch.Generator().manual_seed(4))
    with recording() as records:
        torch.manual_seed(0)
        grads, stepped, s0, s1 = scaler_step(model, compiled, scaler, opt, x, G)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert stepped and s1 == s0, "a finite step must be taken at the same scale"
    assert any(r.transforms for r in records if r.role in ("wgrad", "dgrad"))
    assert all(r.dtype == "float16" for r in records if r.role != "fwd")

    # 1) a single Inf in the incoming gradient only (activations stay finite)
    G_bad = G.clone()
    G_bad[5, 3] = float("inf")
    grads, stepped, s0, s1 = scaler_step(model, compiled, scaler, opt, x, G_bad)
    assert not torch.isfinite(grads[-1]).all(), "the nm op on the last layer's wgrad hid an Inf"
    assert not stepped and s1 == s0 / 2, "GradScaler must skip the step and halve the scale"

    # 2) a NaN in the input
    x_bad = x.clone()
    x_bad[2, 7] = float("nan")
    grads, stepped, s0, s1 = scaler_step(model, compiled, scaler, opt, x_bad, G)
    assert all(not torch.isfinite(g).all() for g in grads)
    assert not stepped and s1 == s0 / 2

    # and a finite step afterwards is taken again
    grads, stepped, s0, s1 = scaler_step(model, compiled, scaler, opt, x, G)
    assert stepped and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.slow
def test_fp16_grad_scaler_inductor():
    """The same Inf in the incoming gradient under Inductor code generation (decomposed ops)."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    compiled = torch.compile(model, backend="nm", options=RECIPES["mvue+luq both"])
    x = torch.randn(T, K, generator=torch.Generator().manual_seed(3))
    G = torch.randn(T, O, generator=torch.Generator().manual_seed(4))
    grads, stepped, s0, s1 = scaler_step(model, compiled, scaler, opt, x, G)
    assert stepped and all(torch.isfinite(g).all() for g in grads)
    G[1, 1] = float("nan")
    grads, stepped, s0, s1 = scaler_step(model, compiled, scaler, opt, x, G)
    assert all(not torch.isfinite(g).any() for g in grads), "LUQ makes every gradient non-finite"
    assert not stepped and s1 == s0 / 2


def test_fp16_weights_without_autocast():
    """Pure fp16 model (no autocast): gradients come back fp16 and pruned along tokens."""
    lin = nn.Linear(K, O, bias=False).half()
    compiled = torch.compile(lin, backend="nm", options={"sparsity": "2:4", "inner": "aot_eager"})
    x = torch.eye(K, dtype=torch.float16)[:T]
    G = torch.randn(T, O, generator=torch.Generator().manual_seed(1)).half()
    torch.manual_seed(9)
    (compiled(x) * G).sum().backward()
    torch.manual_seed(9)
    expected = nmcompile.mvue(G.t(), "2:4", dim=-1)
    assert lin.weight.grad.dtype == torch.float16
    assert torch.equal(lin.weight.grad[:, :T], expected)

"""The pass never breaks a compile: a GEMM whose rewrite fails at any stage is left exactly as it was.

Failures are injected (monkeypatched helpers raising on their n-th call) in the analysis, in the
middle of inserting nodes, and in the lowering. Each time the compile and the step succeed, that
GEMM's record says "not understood" (or "native lowering failed"), no other record is touched, and
its gradient is the dense one: equal to eager autograd where the rest of the model leaves the
neural gradient exact (wgrad-only compression keeps every dX dense).
"""
from __future__ import annotations

import copy

import torch

import nmcompile
from nmcompile.passes import context, conv, forward, lowering, matmul, roles
from tests.models import MLP, ConvNet
from tests.passes.test_native import assert_within_accumulation_bound


def fail_on(monkeypatch, module, name: str, nth: int, when=lambda *a, **k: True) -> list:
    """Make ``module.name`` raise on its ``nth`` call that ``when`` selects; returns the call counter."""
    real = getattr(module, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        if when(*args, **kwargs):
            calls[0] += 1
            if calls[0] == nth:
                raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def step(model, x, options):
    """Records and parameter gradients of one compiled step, and eager autograd's gradients."""
    torch.manual_seed(0)
    compiled_model, eager_model = copy.deepcopy(model), copy.deepcopy(model)
    torch._dynamo.reset()
    with nmcompile.backend.recording() as records:
        torch.compile(compiled_model, backend="nm", options={"inner": "aot_eager", **options})(x).pow(
            2
        ).mean().backward()
    eager_model(x).pow(2).mean().backward()
    grads = {n: p.grad for n, p in compiled_model.named_parameters()}
    return list(records), grads, {n: p.grad for n, p in eager_model.named_parameters()}


def mlp():
    torch.manual_seed(0)
    return MLP((32, 64, 64, 16)), torch.randn(64, 32)


def failed(records) -> list:
    return [r for r in records if r.skipped and r.skipped.startswith("not understood (RuntimeError: injected failure")]


def test_a_backward_gemm_failing_mid_rewrite_stays_dense(monkeypatch):
    model, x = mlp()
    normal, _, _ = step(model, x, {"sparsity": "2:4"})
    # the second gradient-compression splice raises: nodes of that GEMM were being inserted
    fail_on(monkeypatch, context, "splice", 2, when=lambda *a, **k: k["info"].op != "sawb")
    records, grads, eager = step(model, x, {"sparsity": "2:4"})
    [bad] = failed(records)
    assert bad.role == "wgrad" and bad.transforms == []
    assert len(records) == len(normal)
    others = [r for r in records if r is not bad and r.role == "wgrad"]
    assert others and all(r.transforms == ["mvue 2:4 along K (tokens)"] for r in others), "no other record touched"
    name = f"{bad.module}.weight"
    torch.testing.assert_close(grads[name], eager[name], rtol=1e-5, atol=1e-6)  # dense, exactly the eager one
    assert not torch.allclose(grads[f"{others[0].module}.weight"], eager[f"{others[0].module}.weight"])


def test_a_gemm_whose_role_cannot_be_decided_stays_dense_and_says_why(monkeypatch):
    model, x = mlp()
    normal, _, _ = step(model, x, {"sparsity": "2:4"})
    fail_on(monkeypatch, roles.GraphRoles, "_parameter_gradient", 1)  # the first wgrad-side GEMM's output walk
    records, grads, eager = step(model, x, {"sparsity": "2:4"})
    [bad] = [r for r in records if r.skipped == "role not understood (RuntimeError: injected failure)"]
    assert bad.role == "?" and bad.transforms == [] and len(records) == len(normal)
    wgrads = [r for r in records if r.role == "wgrad"]
    assert len(wgrads) == len([r for r in normal if r.role == "wgrad"]) - 1
    assert all(r.transforms == ["mvue 2:4 along K (tokens)"] for r in wgrads), "no other record touched"
    dense = {n for n in grads if torch.allclose(grads[n], eager[n], rtol=1e-5, atol=1e-6)}
    assert sum(n.endswith(".weight") for n in dense) == 1, dense  # the undecided GEMM's weight, and no other


def test_a_failure_before_its_record_exists_never_touches_another(monkeypatch):
    model, x = mlp()
    normal, _, _ = step(model, x, {"sparsity": "2:4"})
    # matmul_operands is the first thing a backward GEMM's rewrite calls (forward GEMMs call it too)
    fail_on(monkeypatch, matmul, "matmul_operands", 5)
    records, _, _ = step(model, x, {"sparsity": "2:4"})
    [bad] = failed(records)
    assert len(records) == len(normal)
    for before, after in zip(normal, records):
        if after is not bad:
            assert (after.role, after.transforms, after.skipped) == (before.role, before.transforms, before.skipped)


def test_a_forward_gemm_failing_between_its_operands_is_left_unquantized(monkeypatch):
    model, x = mlp()
    options = {"fwd_quant": "sawb", "keep_first_last": False}
    # the second operand's layout replay raises after the first operand's SAWB was inserted
    fail_on(monkeypatch, forward, "replay", 2)
    records, _, _ = step(model, x, options)
    [bad] = failed(records)
    assert bad.role == "fwd"
    quantized = [r for r in records if r.role == "fwd" and r.transforms]
    assert len(quantized) == 2, "the other forward GEMMs are quantized"
    for r in records:  # the failed GEMM's backward must not see quantized operands
        if r.module == bad.module and r.role != "fwd":
            assert not any(t.startswith("sawb") for t in r.transforms), r


def test_a_convolution_failing_between_its_two_roles_is_left_whole(monkeypatch):
    torch.manual_seed(0)
    model, x = ConvNet(), torch.randn(4, 3, 8, 8)
    options = {"sparsity": "2:4", "gemms": ["wgrad", "dgrad"], "exclude": "head"}  # conv2 then gets the exact dY
    normal, _, _ = step(model, x, options)
    # conv2's backward: dgrad's shape is read, then wgrad's raises after dgrad's nodes were inserted
    fail_on(monkeypatch, conv, "backward_shape", 2)
    records, grads, eager = step(model, x, options)
    bad = failed(records)
    assert {r.role for r in bad} == {"dgrad", "wgrad"} and {r.module for r in bad} == {"conv2"}
    assert len(records) == len(normal)
    torch.testing.assert_close(grads["conv2.weight"], eager["conv2.weight"], rtol=1e-5, atol=1e-6)


def test_a_failing_native_lowering_leaves_the_emulated_gemm(monkeypatch):
    model, x = mlp()
    options = {
        "sparsity": "2:4",
        "gemms": ["wgrad", "dgrad"],
        "quant": "luq",
        "fwd_quant": "sawb",
        "keep_first_last": False,
        "lowering": "native",
    }
    _, emulated, _ = step(model, x, {**options, "lowering": "emulate"})
    # the third GEMM splice of the lowering raises (float8 codes of its SAWB operand already inserted)
    fail_on(monkeypatch, lowering, "splice", 3, when=lambda *a, **k: k["info"].op == ("gemm",))
    records, grads, _ = step(model, x, options)
    bad = [
        r
        for r in records
        if r.kernel_note and r.kernel_note.startswith("native lowering failed (RuntimeError: injected")
    ]
    assert len(bad) == 1 and bad[0].kernel == "dense"
    assert sum(r.kernel != "dense" for r in records) == len([r for r in records if r.transforms]) - 1
    assert_within_accumulation_bound(list(grads.values()), list(emulated.values()), depth=6, k_max=64)

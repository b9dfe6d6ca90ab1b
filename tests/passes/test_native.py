"""lowering="native" on CPU: the same graph the GPUs run, FP8 and 2:4 GEMM ops included.

For the same seed, native and emulated training compute with the same quantized values (the
float8 codes times their scales are the emulated values bit for bit, tests/kernels/test_gemm.py),
so they differ only in how fp32 accumulates each GEMM: per output element at most
2·γ_K·Σ|a_i||b_i| ≤ 2·γ_K·K·max|a|·max|b| (γ_K ≈ K·2^-24), and one rounding of the output to its
dtype. Through a few layers these add up; the bound below allows ``depth`` such GEMMs at the
largest K, relative to the largest magnitude compared, plus one output ulp per layer in bf16. (A
difference could in principle flip a stochastic rounding downstream; with these seeds none does,
and such a flip would show as a failure far above the bound.)
"""
from __future__ import annotations

import copy
import json
import pytest
import torch
from torch._inductor.utils import run_and_get_code

import nmcompile
from nmcompile.report import Report
from tests.models import MLP, AddmmLayer, ConvNet, Encoder

LUQ_SAWB = {"quant": "luq", "fwd_quant": "sawb", "keep_first_last": False}
SPARSE = {"sparsity": "2:4", "gemms": ["wgrad", "dgrad"]}
BOTH = {**LUQ_SAWB, **SPARSE}
U = 2.0**-24


def model_and_input(name: str):
    torch.manual_seed(0)
    if name == "mlp":
        return MLP((32, 64, 64, 16)), torch.randn(8, 16, 32)
    if name == "encoder":
        return Encoder(32, 4), torch.randn(4, 16, 32)
    if name == "conv":
        return ConvNet(), torch.randn(4, 3, 8, 8)
    return AddmmLayer(32, 16), torch.randn(64, 32)


def run(model, x, options: dict, lowering: str, autocast: bool = False):
    """Output, input gradient and parameter gradients of one compiled step, with the report."""
    model = copy.deepcopy(model)
    x = x.clone().requires_grad_(True)
    torch._dynamo.reset()
    with nmcompile.backend.recording() as records, torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(model, backend="nm", options={**options, "lowering": lowering})
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = compiled(x)
        y.float().pow(2).mean().backward()
    grads = [x.grad] + [p.grad for p in model.parameters()]
    return y.detach().float(), [g.float() for g in grads], Report(list(records), {})


def assert_within_accumulation_bound(native, emulate, depth: int, k_max: int, dtype_eps: float = 0.0):
    tol = depth * (2 * k_max * U / (1 - k_max * U) * k_max + dtype_eps)
    for got, ref in zip(native, emulate):
        scale = ref.abs().max().clamp_min(1e-30)
        assert (got - ref).abs().max() <= tol * scale, ((got - ref).abs().max() / scale, tol)


CASES = [
    ("mlp", LUQ_SAWB, False), ("mlp", SPARSE, False), ("mlp", BOTH, False), ("mlp", BOTH, True),
    ("encoder", BOTH, False), ("encoder", LUQ_SAWB, True), ("conv", BOTH, False), ("addmm", BOTH, False),
    ("addmm", SPARSE, True),
]


@pytest.mark.parametrize("name,options,autocast", CASES,
                         ids=[f"{n}-{'+'.join(sorted(o))}-{'bf16' if a else 'fp32'}" for n, o, a in CASES])
def test_native_equals_emulate_to_accumulation_order(name, options, autocast):
    model, x = model_and_input(name)
    y_e, g_e, rep_e = run(model, x, options, "emulate", autocast)
    y_n, g_n, rep_n = run(model, x, options, "native", autocast)
    assert all(g.kernel == "dense" and g.kernel_note is None for g in rep_e.gemms)
    native = [g for g in rep_n.gemms if g.kernel != "dense"]
    assert native, "some GEMM runs on a native kernel"
    k_max = max(int(g.shape[2]) for g in rep_n.gemms if str(g.shape[2]).isdigit())
    eps = 2.0**-8 if autocast else 0.0
    assert_within_accumulation_bound([y_n, *g_n], [y_e, *g_e], depth=6, k_max=k_max, dtype_eps=eps)


def touched(gemms) -> list:
    """The GEMMs the pass compressed; never empty (so checks over them cannot pass vacuously)."""
    out = [g for g in gemms if g.transforms]
    assert out, "the pass compressed nothing"
    return out


def kernels(report: Report) -> dict:
    return {(g.module, g.role): g.kernel for g in report.gemms}


def test_kernels_chosen_for_each_gemm():
    model, x = model_and_input("mlp")
    _, _, rep = run(model, x, BOTH, "native")
    k = kernels(rep)
    assert {k[(f"fc{i}", "fwd")] for i in (1, 2, 3)} == {"fp8 e4m3"}
    assert {k[(f"fc{i}", r)] for i in (1, 2, 3) for r in ("wgrad", "dgrad") if (f"fc{i}", r) in k} == {"2:4 cpu fp8"}
    _, _, rep = run(model, x, SPARSE, "native", autocast=True)
    assert {g.kernel for g in rep.backward} == {"2:4 cpu bf16"}
    assert {g.kernel for g in rep.forward} == {"dense"}
    # the gradient as the right operand (addmm(b, x, W): dW = xᵀ·dY) runs transposed
    model, x = model_and_input("addmm")
    _, _, rep = run(model, x, BOTH, "native")
    assert kernels(rep)[("", "wgrad")] == "2:4 cpu fp8"


def test_fallbacks_say_why():
    model, x = model_and_input("mlp")
    _, _, rep = run(model, x, BOTH, "auto")
    assert all(g.kernel == "dense" for g in rep.gemms)
    assert all("emulates on cpu" in g.kernel_note for g in touched(rep.gemms))
    _, _, rep = run(model, x, {**BOTH, "smp": 2}, "native")
    kernels_used = {g.kernel for g in touched(rep.backward)}
    assert kernels_used == {"2:4 cpu fp32"}, "the 2:4 structure survives the mean of samples"
    _, _, rep = run(model, x, {**LUQ_SAWB, "smp": 2}, "native")
    assert all(g.kernel == "dense" and "smp=2" in g.kernel_note for g in rep.backward)
    _, _, rep = run(model, x, {**LUQ_SAWB, "bits": 6}, "native")
    assert {g.kernel for g in rep.backward} == {"fp8 e5m2×e4m3"}
    _, _, rep = run(model, x, {**LUQ_SAWB, "bits": 7}, "native")
    assert all(g.kernel == "dense" and "above 6 bits" in g.kernel_note for g in rep.backward)
    _, _, rep = run(model, x, {"sparsity": "3:8"}, "native")
    assert all("3:8 is not a 2:4 structure" in g.kernel_note for g in touched(rep.backward))
    for pattern in ("1:2", "2:8"):  # both are 2:4 structures too
        _, _, rep = run(model, x, {"sparsity": pattern}, "native")
        assert {g.kernel for g in touched(rep.backward)} == {"2:4 cpu fp32"}, pattern
    model, x = model_and_input("conv")
    _, _, rep = run(model, x, BOTH, "native")
    assert all("no native kernel for conv" in g.kernel_note for g in touched(g for g in rep.gemms if g.op == "conv"))


def test_report_carries_the_kernel():
    model, x = model_and_input("mlp")
    _, _, rep = run(model, x, BOTH, "native")
    data = json.loads(rep.to_json())
    assert data["schema"] == "nmcompile.report/3"
    assert {g["kernel"] for g in data["gemms"]} >= {"fp8 e4m3", "2:4 cpu fp8"}
    assert all("cusparselt" in g for g in data["gemms"])
    again = Report.from_json(rep.to_json())
    assert [g.kernel for g in again.gemms] == [g.kernel for g in rep.gemms]
    # the typed forms survive the round trip
    assert [(g.kernel.kernel, g.kernel.formats, g.kernel.impl) for g in again.gemms] == [
        (g.kernel.kernel, g.kernel.formats, g.kernel.impl) for g in rep.gemms]
    assert [[(t.op, t.params, t.where) for t in g.transforms] for g in again.gemms] == [
        [(t.op, t.params, t.where) for t in g.transforms] for g in rep.gemms]
    assert again.summary() == rep.summary()
    version2 = json.loads(rep.to_json())  # labels only: read, shown, not modelled
    version2["schema"] = "nmcompile.report/2"
    for g in version2["gemms"]:
        del g["ops"], g["kernel_use"]
    assert [g.transforms for g in Report.from_json(json.dumps(version2)).gemms] == [g.transforms for g in rep.gemms]
    assert data["summary"]["native_flop_share"] == 1.0
    old = json.loads(rep.to_json())
    old["schema"] = "nmcompile.report/1"
    for g in old["gemms"]:
        del g["kernel"], g["kernel_note"], g["cusparselt"]
    assert {g.kernel for g in Report.from_json(json.dumps(old)).gemms} == {"dense"}
    assert "2:4 cpu fp8" in str(rep)


def test_inductor_calls_the_native_ops_and_keeps_fp8_codes_for_backward():
    model, x = model_and_input("mlp")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="nm", options={**BOTH, "lowering": "native"})
    with torch._inductor.config.patch(force_disable_caches=True):
        _, (fwd, bwd) = run_and_get_code(lambda: compiled(x).pow(2).mean().backward())
    assert fwd.count("torch.ops.nm.fp8_mm.default(") == 3 and fwd.count("torch.ops.nm.sawb_fp8.default(") == 6
    assert bwd.count("torch.ops.nm.sparse24_mm.default(") == 5 and bwd.count("torch.ops.nm.luq_fp8.default(") == 5
    assert "extern_kernels.mm(" not in bwd and "extern_kernels.addmm(" not in fwd
    assert "torch.ops.nm.sawb.default(" not in fwd, "the emulated SAWB values are not computed as well"
    saved = []

    def pack(t):
        saved.append(t.dtype)
        return t

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="nm", options={**BOTH, "lowering": "native"})
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        compiled(x).pow(2).mean().backward()
    # X of fc1..fc3 for the weight gradients, W of fc2, fc3 for the input gradients (x needs none)
    assert saved.count(torch.float8_e4m3fn) == 5, f"the backward keeps the float8 codes of W and X: {saved}"
    assert torch.float32 in saved  # their scales (and ReLU masks etc.)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_native_on_cuda_equals_emulate():
    """On a GPU ``auto`` is native: FP8 (sm89+) and cuSPARSELt 2:4 (sm80+) in a bf16 MLP step."""
    torch.manual_seed(0)
    model, x = MLP((256, 512, 512, 256)).cuda(), torch.randn(4, 64, 256, device="cuda")
    outs = {}
    for lowering in ("emulate", "auto"):
        m = copy.deepcopy(model)
        torch._dynamo.reset()
        with nmcompile.backend.recording() as records:
            compiled = torch.compile(m, backend="nm", options={**BOTH, "lowering": lowering})
            torch.manual_seed(1)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = compiled(x)
            y.float().pow(2).mean().backward()
        outs[lowering] = ([y.detach().float()] + [p.grad.float() for p in m.parameters()], list(records))
    kernels_used = {r.kernel for r in outs["auto"][1] if r.transforms}
    fp8 = torch.cuda.get_device_capability() >= (8, 9)
    assert ({"fp8 e4m3", "2:4 cusparselt fp8"} if fp8 else {"2:4 cusparselt bf16"}) <= kernels_used, kernels_used
    assert all(r.cusparselt == torch.backends.cusparselt.version() for r in outs["auto"][1])
    assert_within_accumulation_bound(outs["auto"][0], outs["emulate"][0], depth=6, k_max=512, dtype_eps=2.0**-8)


def test_bad_lowering_is_refused_and_dynamic_shapes_stay_dense():
    with pytest.raises(ValueError, match=r"lowering='fast' is not allowed; choose one of 'auto', 'emulate', 'native'"):
        nmcompile.NMConfig(lowering="fast")
    model, x = model_and_input("mlp")
    torch._dynamo.reset()
    with nmcompile.backend.recording() as records:
        compiled = torch.compile(model, backend="nm", options={**BOTH, "lowering": "native"}, dynamic=True)
        compiled(x).pow(2).mean().backward()
    assert all(r.kernel == "dense" and "symbolic shapes" in r.kernel_note for r in touched(records))

"""lowering="native" on CPU: the same graph the GPUs run, FP8 and 2:4 GEMM ops included.

Native and emulated training compute with the same quantized values (the float8 codes times their
scales are the emulated values bit for bit, tests/kernels/test_gemm.py), so a native GEMM differs
from the emulated one only in the order in which fp32 accumulates the same products: per output
element at most γ_K·Σ|a_i||b_i| from the exact product (γ_K = K·u/(1−K·u), u = 2^-24), plus a
rounding of the output to its dtype. That bound holds for any BLAS, so it is what the tests check,
GEMM by GEMM, on the inputs each native GEMM actually received:

- ``test_each_native_gemm_is_the_exact_product_of_its_operands``: every ``nm.fp8_mm`` /
  ``nm.sparse24_mm`` call of a native step, against the float64 product of the same operands.
- ``test_native_equals_emulate_end_to_end_where_nothing_rounds_a_native_output``: whole steps,
  native against emulated, only where no rounding decision (MVUE/LUQ's stochastic one, nor SAWB's
  round-to-nearest with its data-dependent scale) reads a native GEMM's output. Elsewhere a
  last-bit difference in one GEMM (another CPU's BLAS accumulating in another order) can flip a
  rounding downstream, and the step then differs by O(1), not O(ulp): no tolerance on whole steps
  is right on every machine, whatever the seed.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import json
import pytest
import torch
from torch._inductor.utils import run_and_get_code
from torch.utils._python_dispatch import TorchDispatchMode

import nmcompile
from nmcompile.kernels import gemm
from nmcompile.kernels.catalog import OPS
from nmcompile.kernels.int8 import scaled_sums
from nmcompile.kernels.sr import sr_scale_of
from nmcompile.recipes import PRESETS
from nmcompile.report import Report
from tests.kernels.stats import max_z, variance_z
from tests.models import MLP, AddmmLayer, ConvNet, Encoder

LUQ_SAWB = {"quant": "luq", "fwd_quant": "sawb", "keep_first_last": False}
SPARSE = {"sparsity": "2:4", "gemms": ["wgrad", "dgrad"]}
BOTH = {**LUQ_SAWB, **SPARSE}
WGRAD = {"quant": "luq", "sparsity": "2:4", "gemms": ["wgrad"], "keep_first_last": False}  # backward only
U = 2.0**-24
# (overload packets: Inductor calls _int_mm's out= overload)
NATIVE_GEMMS = {torch.ops.nm.fp8_mm: "fp8", torch.ops.nm.sparse24_mm: "2:4", torch.ops.aten._int_mm: "int8"}
INT8 = gemm.int8_cpu_support()  # None where this CPU runs exact int8 GEMMs (VNNI / AMX)
needs_int8 = pytest.mark.skipif(INT8 is not None, reason=f"int8 GEMMs: {INT8}")


def model_and_input(name: str):
    torch.manual_seed(0)
    if name == "mlp":
        return MLP((32, 64, 64, 16)), torch.randn(8, 16, 32)
    if name == "encoder":
        return Encoder(32, 4), torch.randn(4, 16, 32)
    if name == "conv":
        return ConvNet(), torch.randn(4, 3, 8, 8)
    return AddmmLayer(32, 16), torch.randn(64, 32)


class NativeGemmCalls(TorchDispatchMode):
    """Keeps every native GEMM call made inside it: (kind, its inputs, its output), all copied."""

    def __init__(self):
        super().__init__()
        self.calls: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in NATIVE_GEMMS:
            copied = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
            self.calls.append((NATIVE_GEMMS[func.overloadpacket], copied, out.clone()))
        return out


def run(model, x, options: dict, lowering: str, autocast: bool = False, *, capture: bool = False, loss=None,
        fp8: bool = False):
    """Output, input gradient and parameter gradients of one compiled step, with the report (and, with
    ``capture``, the native GEMM calls of the step). ``loss``: of the output, default mean(y²).
    ``fp8``: the FP8 kernels (the GPU graph; on CPU a scalar reference only tests select), which take
    precedence over int8 where both could run."""
    with gemm.cpu_reference_kernels() if fp8 else contextlib.nullcontext():
        return _run(model, x, options, lowering, autocast, capture=capture, loss=loss)


def _run(model, x, options: dict, lowering: str, autocast: bool, *, capture: bool, loss):
    model = copy.deepcopy(model)
    x = x.clone().requires_grad_(True)
    options = {**options, "lowering": lowering}
    torch._dynamo.reset()
    calls = NativeGemmCalls() if capture else contextlib.nullcontext()
    backend = "nm"
    if capture:  # the compiled graphs (forward and, below, backward) run inside the mode

        def backend(gm, example_inputs):
            compiled_fn = nmcompile.backend.nm_backend(gm, example_inputs, options=options)

            def call(*args):
                with calls:
                    return compiled_fn(*args)

            return call

    with nmcompile.backend.recording() as records, torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(model, backend=backend, options=None if capture else options)
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = compiled(x)
        with calls:
            (loss or (lambda y: y.float().pow(2).mean()))(y).backward()
    grads = [x.grad] + [p.grad for p in model.parameters()]
    out = y.detach().float(), [g.float() for g in grads], Report(list(records), {})
    return (*out, calls.calls) if capture else out


def exact_product(kind: str, args: list) -> tuple:
    """The float64 product a native GEMM call computes (codes times scales, plus bias) and, per
    element, how far from it any GEMM of the same operands accumulating in fp32 may land, in any
    order: γ_{K+3}·(Σ|a_i||b_i| + |bias|) (the two scales and the bias are three more roundings),
    plus at most two roundings to the output dtype (half an ulp each; a second one where the bias is
    added after the product was rounded), and what underflow may lose."""
    if kind == "int8":  # the integer sums: exact, nothing to bound
        a, b = args
        return (a.long() @ b.long()).double(), torch.zeros(())
    if kind == "fp8":
        a, sa, b, sb, bias, out_dtype = args
    else:
        (a, b, sa, sb, out_dtype), bias = args, None
    a = a.double() * (sa.double() if sa is not None else 1)  # exact: a float8 code times an fp32 scale
    b = b.double() * (sb.double() if sb is not None else 1)
    bias = bias.double() if bias is not None else torch.zeros((), dtype=torch.float64)
    k = a.shape[1] + 3
    gamma = k * U / (1 - k * U)
    magnitude = a.abs() @ b.abs() + bias.abs()
    out = torch.finfo(out_dtype)
    underflow = k * 2.0**-149 + out.smallest_normal * out.eps  # fp32's and the output's subnormal steps
    bound = (gamma + out.eps) * (1 + 2 * gamma) * magnitude + underflow
    return a @ b + bias, bound


def assert_within(got: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor, what: str):
    err = (got.double() - exact).abs()
    assert (err <= bound).all(), f"{what}: off by {(err / bound).max().item():.3g}× the accumulation bound"


def assert_records(rep_e: Report, rep_n: Report):
    """Emulate keeps every GEMM dense and silent; native runs some on a native kernel; both record
    the same GEMMs."""
    assert all(g.kernel == "dense" and g.kernel_note is None for g in rep_e.gemms)
    assert any(g.kernel != "dense" for g in rep_n.gemms), "some GEMM runs on a native kernel"
    assert [(g.role, tuple(g.shape)) for g in rep_n.gemms] == [(g.role, tuple(g.shape)) for g in rep_e.gemms]


def calls_of(report: Report) -> list:
    """The native GEMM calls the report promises for one step: (kind, sorted (M, N), K) each."""
    kinds = [(g.kernel.spec.codes if g.kernel.spec.codes and not g.kernel.spec.sparse24 else "2:4", g.shape)
             for g in report.gemms if g.kernel != "dense"]
    kinds = [("fp8" if kind == "float8" else kind, shape) for kind, shape in kinds]
    return sorted((kind, tuple(sorted(int(s) for s in shape[:2])), int(shape[2])) for kind, shape in kinds)


INT8_FWD = {"quant": "luq", "fwd_quant": "absmax", "fwd_bits": 8, "keep_first_last": False}
# SR8 gradients (per-row scales), absmax8 forward, every layer on int8 (tests/passes/test_speed.py: dense_if_faster)
# recompute off: these tests count one native call per GEMM record, and a recomputed forward GEMM runs twice
# (tests/passes/test_recompute.py tests that recompute changes no number)
INT8_PRESET = {**PRESETS["int8"], "keep_first_last": False, "dense_if_faster": False, "recompute": False}
INT8_TENSOR = {**INT8_PRESET, "scales": "tensor"}  # one SR8 scale per tensor
INT8_ROWS = {**INT8_PRESET, "fwd_scales": "row"}  # per-row scales on both sides
CASES = [  # (model, options, autocast, kernels: "fp8" the GPU graph's FP8 / 2:4, "int8" the CPU default)
    ("mlp", LUQ_SAWB, False, "fp8"), ("mlp", SPARSE, False, "fp8"), ("mlp", BOTH, False, "fp8"),
    ("mlp", BOTH, True, "fp8"), ("encoder", BOTH, False, "fp8"), ("encoder", LUQ_SAWB, True, "fp8"),
    ("conv", BOTH, False, "fp8"), ("addmm", BOTH, False, "fp8"), ("addmm", SPARSE, True, "fp8"),
    ("mlp", LUQ_SAWB, False, "int8"), ("mlp", BOTH, True, "int8"), ("encoder", INT8_FWD, True, "int8"),
    ("addmm", BOTH, False, "int8"), ("conv", INT8_FWD, False, "int8"),
    ("encoder", INT8_PRESET, False, "int8"), ("mlp", INT8_PRESET, True, "int8"), ("addmm", INT8_PRESET, True, "int8"),
    ("encoder", INT8_TENSOR, True, "int8"), ("mlp", INT8_ROWS, False, "int8"),
]


def case_id(name: str, options: dict, autocast: bool, kernels: str = "fp8") -> str:
    return f"{name}-{'+'.join(sorted(options))}-{'bf16' if autocast else 'fp32'}-{kernels}"


@pytest.mark.parametrize("name,options,autocast,kernels", CASES, ids=[case_id(*c) for c in CASES])
def test_each_native_gemm_is_the_exact_product_of_its_operands(name, options, autocast, kernels):
    """Each native GEMM against the emulated computation of the same product on the same operands
    (dequantized codes, dense, here in float64): the accumulation bound holds on any CPU, whatever
    the rounding decisions upstream drew (only the operands' values matter). An int8 GEMM's integer
    sums are exact; its scaling is checked where Inductor fuses it (``test_int8_scaling_...``)."""
    if kernels == "int8" and INT8 is not None:
        pytest.skip(f"int8 GEMMs: {INT8}")
    model, x = model_and_input(name)
    _, _, rep_e = run(model, x, options, "emulate", autocast)
    _, _, rep_n, calls = run(model, x, options, "native", autocast, capture=True, fp8=kernels == "fp8")
    assert_records(rep_e, rep_n)
    assert {g.kernel.spec.codes for g in rep_n.gemms if g.kernel != "dense" and g.kernel.spec.codes} == (
        {"float8"} if kernels == "fp8" and options is not SPARSE else {kernels} if kernels == "int8" else set())
    # one call per native record, of its kind and shape (a 2:4 GEMM may run transposed)
    made = sorted((kind, tuple(sorted(out.shape)), args[0].shape[1]) for kind, args, out in calls)
    assert made == calls_of(rep_n)
    for i, (kind, args, out) in enumerate(calls):
        assert out.dtype == (torch.int32 if kind == "int8" else args[-1])
        assert_within(out, *exact_product(kind, args), f"native GEMM {i} ({kind}, {tuple(out.shape)})")


@needs_int8
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("options", [BOTH, INT8_FWD, INT8_ROWS], ids=["luq+sawb", "luq+absmax8", "absmax8 per row"])
def test_int8_scaling_fused_by_inductor_rounds_the_exact_product_once(options, autocast):
    """The forward of a one-GEMM layer under Inductor: its output is the int8 GEMM's scaled sums as
    Inductor's fused kernel computes them, against ``nm.int8_mm`` on the codes of the same X and W
    (per row: X's scales per row [T, 1]; W, stored [in, out], reduces over its first dim, so per tensor)."""
    model, x = model_and_input("addmm")
    y, _, rep = run(model, x, options, "auto", autocast)
    assert kernels(rep)[("", "fwd")] == "int8"
    dtype = torch.bfloat16 if autocast else torch.float32
    codes_op = getattr(torch.ops.nm, OPS[options["fwd_quant"]].int8_op)
    bits = options.get("fwd_bits", 4)
    rows = (1,) if options.get("fwd_scales") == "row" else ()
    (cx, sx), (cw, sw) = codes_op(x.to(dtype), bits, *rows), codes_op(model.W.detach().to(dtype), bits)
    assert sx.shape == ((x.shape[0], 1) if rows else ())
    expected = torch.ops.nm.int8_mm(cx, sx, cw, sw, model.b.detach().to(dtype), dtype)
    assert torch.equal(y, expected.float())


@needs_int8
@pytest.mark.parametrize("autocast", [False, True])
def test_power_of_two_scales_rescale_the_int8_sums_in_fp32_inside_inductors_kernel(autocast):
    """absmax8 per row with ``pow2_scales``: the forward's output is the fp32 rescale of the int8 sums
    (kernels/int8.py) of the codes of the same X and W, whose scales are powers of two."""
    model, x = model_and_input("addmm")
    options = {**INT8_ROWS, "pow2_scales": True}
    y, _, rep = run(model, x, options, "auto", autocast)
    assert kernels(rep)[("", "fwd")] == "int8"
    dtype = torch.bfloat16 if autocast else torch.float32
    (cx, sx), (cw, sw) = (torch.ops.nm.absmax_int8(x.to(dtype), 8, 1, True),
                          torch.ops.nm.absmax_int8(model.W.detach().to(dtype), 8, None, True))
    assert (torch.frexp(sx)[0] == 0.5).all() and torch.frexp(sw)[0] == 0.5
    expected = scaled_sums(gemm.int_sums(cx, cw), sx, sw, model.b.detach().to(dtype), dtype, pow2=True)
    assert torch.equal(y, expected.float())


def _float64_nodes(options: dict) -> int:
    """Nodes computing in float64 in the encoder's lowered forward and backward graphs."""
    from nmcompile.capture import run_captured

    model, x = model_and_input("encoder")
    run = run_captured(model, (x,), {**options, "lowering": "auto", "inner": "aot_eager"})
    return sum(isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dtype == torch.float64
               for kind in ("forward", "backward") for n in getattr(run.graphs[0], kind).graph.nodes)


@needs_int8
def test_with_power_of_two_scales_no_int8_gemm_rescales_in_float64():
    """The int8 preset's 12 Linear GEMMs of a block rescale their sums in float64 by default, and in fp32 with
    ``pow2_scales`` (where the scales of both operands are powers of two): from the graph, not from timing."""
    assert _float64_nodes(INT8_PRESET) > 0
    assert _float64_nodes({**INT8_PRESET, "pow2_scales": True}) == 0


@needs_int8
@pytest.mark.parametrize("autocast", [False, True])
def test_the_int8_preset_runs_every_linear_gemm_of_a_transformer_block_on_int8(autocast):
    """Forward, dgrad and wgrad of the block's four Linear layers (in_proj, out_proj, linear1, linear2): 12 int8
    GEMMs. Attention's two batched GEMMs and their four backward ones multiply activations and stay dense."""
    model, x = model_and_input("encoder")
    _, _, rep = run(model, x, INT8_PRESET, "auto", autocast)
    linear = [g for g in rep.gemms if g.op in ("mm", "addmm")]
    assert len(linear) == 12 and all(g.kernel.spec.codes == "int8" for g in linear if g.kernel != "dense"), rep
    assert all(g.kernel != "dense" for g in linear), rep
    assert {g.role for g in rep.gemms if g.op == "bmm"} == {"fwd", "act_lhs", "act_rhs"}
    # the SR8 scales are per row along each backward GEMM's own K: tokens for a wgrad, features for a dgrad
    assert all("sr8/row" in g.transforms for g in linear if g.role != "fwd"), rep


@needs_int8
def test_per_row_forward_scales_run_every_linear_gemm_on_int8_folding_the_scales_that_vary_along_k():
    """absmax8 per row of W and X along the forward GEMM's K: the forward GEMMs run on int8. out_proj's input is
    attention's output with its heads merged back into features: its per-row scales are those of that merged copy
    (the heads' own output has its features split across heads). The backward GEMMs that reuse W (dgrad, K = out)
    or X (wgrad, K = tokens) contract the dim the scales vary along: those scales multiply the SR8 gradient before
    it is quantized, so these GEMMs take the forward codes and run on int8 too, and their notes say so."""
    model, x = model_and_input("encoder")
    _, _, rep = run(model, x, INT8_ROWS, "auto", False)
    linear = [g for g in rep.gemms if g.op in ("mm", "addmm")]
    assert len(linear) == 12 and all(g.kernel.spec.codes == "int8" for g in linear), rep
    fwd = [g for g in linear if g.role == "fwd"]
    assert sum("absmax8/row W,X" in g.transforms for g in fwd) == 4 and not any(g.notes for g in fwd)
    folded = [g for g in linear if g.kernel_note and "multiply the gradient before it is quantized" in g.kernel_note]
    # every dgrad reading a per-row W, every wgrad reading a per-row X
    assert sorted(g.role for g in folded) == ["dgrad"] * 4 + ["wgrad"] * 4, rep
    # the gradient's codes op forms g·s itself (its times argument): no fp32 product of g is written first
    from nmcompile.capture import run_captured

    x = x.clone().requires_grad_(True)  # as run() does: the first layer has its dgrad too
    backward = run_captured(model, (x,), {**INT8_ROWS, "lowering": "auto", "inner": "aot_eager"}).graphs[0].backward
    quantizers = [n for n in backward.graph.nodes if n.target is torch.ops.nm.sr_int8.default]
    own = len(OPS["sr"].args) + 1  # x and the op's own arguments; times follows them
    with_times = [n for n in quantizers
                  if n.kwargs.get("times", n.args[own] if len(n.args) > own else None) is not None]
    assert len(with_times) == 8 and len(quantizers) == 8, backward.code  # one per backward GEMM
    assert all(not (isinstance(n.args[0], torch.fx.Node) and n.args[0].target is torch.ops.aten.mul.Tensor)
               for n in with_times)


def test_attentions_output_is_rounded_per_row_of_its_merged_heads():
    """out_proj's input is attention's output with its heads merged back into features. The heads' own output has
    each token's features split over heads, so per-row scales there would vary along out_proj's K: the forward
    quantizer rounds the merged copy instead, one scale per token over all its features. Only kᵀ and v, whose K is
    no tensor's last dim, keep one scale per tensor."""
    from nmcompile.capture import run_captured
    from nmcompile.passes.analysis import layout_chain

    def dims(act_gemms: bool):
        model, x = model_and_input("encoder")
        options = {**INT8_ROWS, "fwd_act_gemms": act_gemms, "lowering": "emulate", "inner": "aot_eager"}
        forward = run_captured(model, (x,), options).graphs[0].forward
        return x, {n: (n.args[2] if len(n.args) > 2 else n.kwargs.get("dim")) for n in forward.graph.nodes
                   if n.target is torch.ops.nm.absmax.default}

    x, dim = dims(act_gemms=True)
    assert len(dim) == 12 and sum(d is None for d in dim.values()) == 2, dim  # 4 Linear × (W, X); q, kᵀ, p, v
    preset = dims(act_gemms=PRESETS["int8"]["fwd_act_gemms"])[1]  # False: attention's own GEMMs unquantized
    assert len(preset) == 8 and all(d is not None for d in preset.values()), preset
    # the one whose input is laid out from attention's p @ v
    (merged,) = [n for n, d in dim.items() if d is not None
                 and layout_chain(n.args[0])[0].target is torch.ops.aten.bmm.default]
    source = merged.args[0].meta["val"]
    assert source.shape[-1] == 32 and source.numel() == x.numel() and dim[merged] % source.dim() == source.dim() - 1


def _dtypes_of_the_rest(options: dict) -> collections.Counter:
    """(graph, op, dtype) of every floating-point node of one autocast step of the encoder that the pass did not
    insert (no ``nm`` meta), leaving out the GEMMs and layout ops (which the int8 lowering replaces)."""
    from nmcompile.capture import run_captured
    from nmcompile.passes.analysis import LAYOUT_OPS, MATMULS

    model, x = model_and_input("encoder")
    with torch.autocast("cpu", torch.bfloat16):
        run = run_captured(model, (x,), {**options, "inner": "aot_eager"})
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    skip = set(MATMULS) | LAYOUT_OPS | {torch.ops.aten.permute.default, torch.ops.aten.expand.default}
    out = collections.Counter()
    for kind in ("forward", "backward"):
        gm = getattr(run.graphs[0], kind)
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        inputs = [mode.from_tensor(n.meta["val"]) if isinstance(n.meta.get("val"), torch.Tensor) else n.meta.get("val")
                  for n in gm.graph.nodes if n.op == "placeholder"]
        FakeTensorProp(gm, mode).propagate(*inputs)  # the dtypes the graph computes now, not those traced before
        for n in gm.graph.nodes:
            value = n.meta.get("val")
            if (n.op == "call_function" and "nm" not in n.meta and n.target not in skip
                    and isinstance(value, torch.Tensor) and value.is_floating_point()):
                out[kind, str(n.target), value.dtype] += 1
    return out


@needs_int8
def test_under_autocast_everything_but_the_int8_gemms_runs_in_the_dtypes_autocast_gives_it():
    """The int8 preset with every layer on int8, under bf16 autocast: attention (its batched GEMMs, softmax),
    LayerNorm, GELU, the residual adds and their backward ops keep the dtype each has in the same step without
    the pass; what the pass adds (quantizers, the int8 GEMMs' rescaling) is all it adds."""
    nm, plain = _dtypes_of_the_rest(INT8_PRESET), _dtypes_of_the_rest({})
    assert sum(c for (_, _, dtype), c in plain.items() if dtype == torch.bfloat16) > 20  # autocast's bf16 work
    assert nm == plain, {k: (nm[k], plain[k]) for k in set(nm) | set(plain) if nm[k] != plain[k]}


class _Bare(torch.nn.Module):  # y = x @ W.T: the gradient is the wgrad's left operand and the dgrad's left one
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.W = torch.nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)

    def forward(self, x):
        return x @ self.W.t()


def _sr8_variance(v: torch.Tensor, dim: int) -> torch.Tensor:
    """Per element of v, SR8's variance with one scale per slice along ``dim`` (kernels/sr.py):
    (v' - lo)(lo + 1 - v')·scale², v' = |v| / scale."""
    scale = sr_scale_of(v, 8, dim).double()
    w = v.double().abs() / scale
    frac = w - w.floor()
    return frac * (1 - frac) * scale**2


@needs_int8
@pytest.mark.parametrize("layer", ["x @ W.T", "addmm(b, x, W)"])
def test_folded_scales_keep_the_backward_gemms_unbiased_with_the_variance_derived_for_them(layer):
    """A folded backward GEMM computes SR8(g·s) @ codes, where s·codes is the forward's per-row quantized operand:
    E = g @ (s·codes), the product the emulated graph estimates, and Var(out[i, j]) = Σ_k Var(SR8(g·s)[i, k])·
    codes[k, j]² with SR8's exact per-element variance (per row along K of g·s). 400 steps with a fixed upstream
    gradient G (loss = sum(y·G)): each output element's mean within 5 standard errors of g @ (s·codes), and the
    summed variance within 5 of its standard error of the derived one; the same bound rejects the variance of
    SR8(g) @ (s·codes), the unfolded estimator."""
    torch.manual_seed(0)
    t, d_in, d_out = 64, 32, 24
    model = _Bare(d_in, d_out) if layer == "x @ W.T" else AddmmLayer(d_in, d_out)
    x, G = torch.randn(t, d_in) * torch.rand(t, 1) * 3, torch.randn(t, d_out) * torch.rand(1, d_out) * 2
    options = {**INT8_ROWS, "inner": "aot_eager"}
    compiled = torch.compile(model, backend="nm", options=options)
    draws = {"dW": [], "dx": []}
    with nmcompile.backend.recording() as records:
        for _ in range(400):
            xi = x.clone().requires_grad_(True)
            (compiled(xi) * G).sum().backward()
            draws["dW"].append(model.W.grad.clone())
            draws["dx"].append(xi.grad.clone())
            model.zero_grad(set_to_none=True)
    rep = Report(list(records), {})
    assert {g.role: g.kernel.spec.codes for g in rep.gemms} == {"fwd": "int8", "dgrad": "int8", "wgrad": "int8"}
    cx, sx = torch.ops.nm.absmax_int8(x, 8, 1)  # per token
    cases = {}
    if layer == "x @ W.T":  # W [out, in] per row (output feature): both backward GEMMs fold
        cw, sw = torch.ops.nm.absmax_int8(model.W.detach(), 8, 1)
        v = G * sx  # dW = (G·s_x)ᵀ @ cx: SR8 along tokens, per output feature
        cases["dW"] = (v.t(), cx, 1, False)
        v = G * sw.t()  # dx = (G·s_wᵀ) @ cw: SR8 along outputs, per token
        cases["dx"] = (v, cw, 1, False)
        unfolded = (G.t(), (cx * sx), 1)
    else:  # W [in, out]: per tensor (its rows are not along the forward's K); dW = cxᵀ @ SR8(G·s_x), per column
        cases["dW"] = (G * sx, cx.t(), 0, True)
        unfolded = (G, (cx * sx).t(), 0)
    for name, (v, codes, dim, right) in cases.items():
        samples = torch.stack(draws[name]).double()
        c = codes.double()
        var = _sr8_variance(v, dim)
        target = c @ v.double() if right else v.double() @ c
        variance = (c**2) @ var if right else var @ (c**2)
        assert max_z(samples, target, variance) < 5, name
        assert variance_z(samples.flatten(1)[:, None], variance.sum()) < 5, name
    g, other, dim = unfolded  # the estimator before the fold: SR8 of g itself times the dequantized operand
    var = _sr8_variance(g, dim)
    variance = (other.double()**2) @ var if dim == 0 else var @ (other.double()**2)
    assert variance_z(torch.stack(draws["dW"]).double().flatten(1)[:, None], variance.sum()) > 5


# Steps in which every native GEMM's output is a result of the step (an output, or a gradient no one
# reads): the forward GEMM of a one-GEMM model under a loss linear in its output (the output
# gradient is then the same tensor in both steps), or weight gradients alone. Run op by op
# (aot_eager), so everything that does not read a native output is computed by the same kernels
# from the same bits in both steps, rounding decisions included.
END_TO_END = [("addmm", BOTH, False), ("addmm", SPARSE, True), ("mlp", WGRAD, False), ("encoder", WGRAD, True)]
# (the FP8 / 2:4 graph: an int8 GEMM's output is not one op's output, and its scaling is checked above)


def linear_loss(y: torch.Tensor) -> torch.Tensor:
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    return (y.float() * weights).sum()


@pytest.mark.parametrize("name,options,autocast", END_TO_END, ids=[case_id(*c) for c in END_TO_END])
def test_native_equals_emulate_end_to_end_where_nothing_rounds_a_native_output(name, options, autocast):
    model, x = model_and_input(name)
    names = [n for n, _ in model.named_parameters()]
    options = {**options, "inner": "aot_eager"}
    y_e, g_e, rep_e = run(model, x, options, "emulate", autocast, loss=linear_loss)
    y_n, g_n, rep_n, calls = run(model, x, options, "native", autocast, capture=True, loss=linear_loss, fp8=True)
    assert_records(rep_e, rep_n)
    assert len(calls) == len(calls_of(rep_n))
    results = {"output": y_n, "input gradient": g_n[0], **{f"gradient of {n}": g for n, g in zip(names, g_n[1:])}}
    emulated = dict(zip(results, [y_e, *g_e]))
    # which result each native GEMM gave (itself or its transpose): all of them, or the case is unsafe
    gave = {}
    for i, (kind, args, out) in enumerate(calls):
        same = [(what, t) for what, r in results.items() for t in (False, True)
                if (out.t() if t else out).shape == r.shape and torch.equal((out.t() if t else out).float(), r)]
        assert same, f"native GEMM {i} ({kind}, {tuple(out.shape)}) is not one of the step's results"
        gave[same[0][0]] = (kind, args, same[0][1])
    for what, native in results.items():
        if what not in gave:
            assert torch.equal(native, emulated[what]), f"the {what} reads no native GEMM, yet differs"
            continue
        kind, args, transposed = gave[what]
        exact, bound = exact_product(kind, args)
        if transposed:
            exact, bound = exact.t(), bound.t()
        assert_within(native, exact, bound, f"native {what}")
        assert_within(emulated[what], exact, bound, f"emulated {what}")


def assert_within_accumulation_bound(native, emulate, depth: int, k_max: int, dtype_eps: float = 0.0):
    """Whole steps within ``depth`` GEMMs' accumulation bound at the largest K, relative to the largest
    magnitude (the CUDA test's seeded check; see the module docstring for why it is not exact)."""
    tol = depth * (2 * k_max * U / (1 - k_max * U) * k_max + dtype_eps)
    for got, ref in zip(native, emulate):
        scale = ref.abs().max().clamp_min(1e-30)
        assert (got - ref).abs().max() <= tol * scale, ((got - ref).abs().max() / scale, tol)


def touched(gemms) -> list:
    """The GEMMs the pass compressed; never empty (so checks over them cannot pass vacuously)."""
    out = [g for g in gemms if g.transforms]
    assert out, "the pass compressed nothing"
    return out


def kernels(report: Report) -> dict:
    return {(g.module, g.role): g.kernel for g in report.gemms}


def test_kernels_chosen_for_each_gemm():
    model, x = model_and_input("mlp")
    _, _, rep = run(model, x, BOTH, "native", fp8=True)
    k = kernels(rep)
    assert {k[(f"fc{i}", "fwd")] for i in (1, 2, 3)} == {"fp8 e4m3"}
    assert {k[(f"fc{i}", r)] for i in (1, 2, 3) for r in ("wgrad", "dgrad") if (f"fc{i}", r) in k} == {"2:4 cpu fp8"}
    _, _, rep = run(model, x, SPARSE, "native", autocast=True)
    assert {g.kernel for g in rep.backward} == {"2:4 cpu bf16"}
    assert {g.kernel for g in rep.forward} == {"dense"}
    # the gradient as the right operand (addmm(b, x, W): dW = xᵀ·dY) runs transposed
    model, x = model_and_input("addmm")
    _, _, rep = run(model, x, BOTH, "native", fp8=True)
    assert kernels(rep)[("", "wgrad")] == "2:4 cpu fp8"


@needs_int8
def test_auto_runs_int8_on_cpu_wherever_both_operands_have_int8_codes():
    model, x = model_and_input("mlp")
    for lowering in ("auto", "native"):
        _, _, rep = run(model, x, BOTH, lowering)
        # every GEMM with both operands quantized, the 2:4 + LUQ gradients included (dense int8 on CPU)
        assert {g.kernel for g in touched(rep.gemms)} == {"int8"}, lowering
        assert all(g.kernel.formats == ("int8", "int8") and g.kernel.impl == "int_mm" for g in touched(rep.gemms))
        assert all(g.kernel_note is None for g in touched(rep.gemms)), "no note about the CPU's FP8 reference"
    # a gradient pruned but not quantized: the CPU's 2:4 product is a dense GEMM, so auto leaves it be
    _, _, rep = run(model, x, SPARSE, "auto")
    assert all(g.kernel == "dense" and "lowering='native' runs it" in g.kernel_note for g in touched(rep.backward))
    _, _, rep = run(model, x, {**LUQ_SAWB, "bits": 6}, "auto")  # LUQ6 has no int8 codes; FP8 never on CPU
    assert all(g.kernel == "dense" and "above int8's 127" in g.kernel_note and "scalar reference" in g.kernel_note
               for g in rep.backward)


def test_fallbacks_say_why(monkeypatch):
    model, x = model_and_input("mlp")
    monkeypatch.setattr(gemm, "_int8_on_cpu", "this CPU has neither AVX512-VNNI nor AMX")
    _, _, rep = run(model, x, LUQ_SAWB, "auto")
    assert all(g.kernel == "dense" and "int8: this CPU has neither" in g.kernel_note for g in touched(rep.gemms)
               if g.role == "fwd")
    monkeypatch.undo()
    _, _, rep = run(model, x, {**BOTH, "smp": 2}, "native", fp8=True)
    kernels_used = {g.kernel for g in touched(rep.backward)}
    assert kernels_used == {"2:4 cpu fp32"}, "the 2:4 structure survives the mean of samples"
    _, _, rep = run(model, x, {**LUQ_SAWB, "smp": 2}, "native", fp8=True)
    assert all(g.kernel == "dense" and "smp=2" in g.kernel_note for g in rep.backward)
    _, _, rep = run(model, x, {**LUQ_SAWB, "bits": 6}, "native", fp8=True)
    assert {g.kernel for g in rep.backward} == {"fp8 e5m2×e4m3"}
    _, _, rep = run(model, x, {**LUQ_SAWB, "bits": 7}, "native", fp8=True)
    assert all(g.kernel == "dense" and "above 6 bits" in g.kernel_note for g in rep.backward)
    _, _, rep = run(model, x, {"sparsity": "3:8"}, "native")
    assert all("3:8 is not a 2:4 structure" in g.kernel_note for g in touched(rep.backward))
    for pattern in ("1:2", "2:8"):  # both are 2:4 structures too
        _, _, rep = run(model, x, {"sparsity": pattern}, "native")
        assert {g.kernel for g in touched(rep.backward)} == {"2:4 cpu fp32"}, pattern
    model, x = model_and_input("conv")
    _, _, rep = run(model, x, BOTH, "native", fp8=True)
    assert all("no native kernel for conv" in g.kernel_note for g in touched(g for g in rep.gemms if g.op == "conv"))


def test_report_carries_the_kernel():
    model, x = model_and_input("mlp")
    _, _, rep = run(model, x, BOTH, "native", fp8=True)
    data = json.loads(rep.to_json())
    assert data["schema"] == "nmcompile.report/6"
    assert all(g["role_why"] for g in data["gemms"] if g["role"] != "fwd")
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


def native_code_and_saved(options: dict, fp8: bool = False):
    """Inductor's forward and backward code of one native MLP step, and the dtypes autograd saved."""
    model, x = model_and_input("mlp")
    options = {**options, "lowering": "native"}
    with gemm.cpu_reference_kernels() if fp8 else contextlib.nullcontext():
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="nm", options=options)
        with torch._inductor.config.patch(force_disable_caches=True):
            _, (fwd, bwd) = run_and_get_code(lambda: compiled(x).pow(2).mean().backward())
        saved = []

        def pack(t):
            saved.append(t.dtype)
            return t

        torch._dynamo.reset()
        compiled = torch.compile(model, backend="nm", options=options)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            compiled(x).pow(2).mean().backward()
    return fwd, bwd, saved


def test_inductor_calls_the_native_ops_and_keeps_fp8_codes_for_backward():
    fwd, bwd, saved = native_code_and_saved(BOTH, fp8=True)
    assert fwd.count("torch.ops.nm.fp8_mm.default(") == 3 and fwd.count("torch.ops.nm.sawb_fp8.default(") == 6
    assert bwd.count("torch.ops.nm.sparse24_mm.default(") == 5 and bwd.count("torch.ops.nm.luq_fp8.default(") == 5
    assert "extern_kernels.mm(" not in bwd and "extern_kernels.addmm(" not in fwd
    assert "torch.ops.nm.sawb.default(" not in fwd, "the emulated SAWB values are not computed as well"
    # X of fc1..fc3 for the weight gradients, W of fc2, fc3 for the input gradients (x needs none)
    assert saved.count(torch.float8_e4m3fn) == 5, f"the backward keeps the float8 codes of W and X: {saved}"
    assert torch.float32 in saved  # their scales (and ReLU masks etc.)


@needs_int8
def test_inductor_runs_int8_gemms_and_keeps_int8_codes_for_backward():
    fwd, bwd, saved = native_code_and_saved(BOTH)
    assert fwd.count("_int_mm(") == 3 and fwd.count("torch.ops.nm.sawb_int8.default(") == 6
    assert bwd.count("_int_mm(") == 5 and bwd.count("torch.ops.nm.luq_int8.default(") == 5
    assert "extern_kernels.mm(" not in bwd and "extern_kernels.addmm(" not in fwd
    assert "torch.ops.nm.sawb.default(" not in fwd and "torch.ops.nm.luq.default(" not in bwd
    assert "torch.ops.nm.int8_mm" not in fwd, "the scaling is Inductor's (fused), not an opaque op"
    assert saved.count(torch.int8) == 5, f"the backward keeps the int8 codes of W and X: {saved}"


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

"""Every op of kernels/catalog.py through every consumer: a description that lacks something, or a
consumer that does not handle an op, fails here instead of silently leaving the op out."""
from __future__ import annotations

import json
import re

import pytest
import torch

from nmcompile.capture import run_captured
from nmcompile.export import graph_code, model_explorer_graph, nm_attrs, to_dot
from nmcompile.kernels import cpu
from nmcompile.kernels.catalog import KINDS, OPS, STAGES, Form, Kind, OpSpec, Stage
from nmcompile.kernels.gemm import DENSE_USE, cpu_reference_kernels, int8_cpu_support
from nmcompile.noise import NoiseMonitor
from nmcompile.passes.config import NMConfig
from nmcompile.passes.records import Transform
from nmcompile.profiling import Annotator
from nmcompile.report import tensor_core_speedup
from tests.models import MLP

SPECS = list(OPS.values())
# every op, and every quantizer once more with per-row scales: (spec, rows)
VARIANTS = [(s, False) for s in SPECS] + [(s, True) for s in SPECS if s.row_scales]
IDS = [s.name + ("/row" if rows else "") for s, rows in VARIANTS]


def options_for(spec: OpSpec, rows: bool = False) -> dict:
    """Backend options under which the rewrite applies ``spec`` (every GEMM it can serve)."""
    scales = "row" if rows else "tensor"
    if spec.kind == "prune":
        return {"sparsity": "2:4", "method": spec.name, "gemms": ["wgrad", "dgrad"]}
    if spec.stage == "gradient":
        return {"quant": spec.name, "scales": scales}
    return {"fwd_quant": spec.name, "keep_first_last": False, "fwd_scales": scales}


def example_params(spec: OpSpec) -> dict:
    config = NMConfig(**options_for(spec))
    return {"n": 2, "m": 4, "dim": 1} if spec.kind == "prune" else config.params_for(spec)


def model_and_input():
    torch.manual_seed(0)
    return MLP((32, 64, 64, 16)), torch.randn(4, 16, 32)


@pytest.fixture(scope="module")
def runs():
    """Each op's graphs as the rewrite leaves them (emulated: the op itself, not its codes form)."""
    out = {}
    for (spec, rows), name in zip(VARIANTS, IDS):
        model, x = model_and_input()
        out[name] = run_captured(model, (x,), {**options_for(spec, rows), "lowering": "emulate"})
    return out


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_every_description_is_complete(spec):
    assert spec.kind in KINDS and spec.stage in STAGES
    assert isinstance(spec.kind, Kind) and isinstance(spec.stage, Stage)  # typed, even where given as strings
    assert spec.kind == "quantize" or spec.stage == "gradient"  # pruning serves gradients only
    schema = spec.op._schema  # the op is registered, and its description says how
    assert spec.args == tuple(a.name for a in schema.arguments[1:]), (spec.args, str(schema))
    assert isinstance(spec.unbiased, bool) and spec.summary and spec.onnx_type
    assert re.fullmatch(r"#[0-9a-f]{6}", spec.color)
    assert set(spec.onnx_attrs) <= set(spec.args)
    params = example_params(spec)
    assert isinstance(spec.label(params), str) and spec.label(params)
    form = spec.form(params)
    assert isinstance(form, Form)
    if spec.kind == "prune":
        assert form.structure == (2, 4) and form.sparse24 and not spec.options
    else:
        assert spec.bits and isinstance(form.max_code, int) and form.max_code > 0
        assert set(spec.options) <= set(spec.args) | {"samples"}
        assert all(key in NMConfig.keys() for key in spec.options.values())
        assert form.float8 is not None or form.why
    for name in (spec.codes_op, spec.int8_op):  # the codes forms take the op's own arguments
        if name is not None:
            codes_op = getattr(torch.ops.nm, name).default
            extra = ["times"] if name == spec.int8_op and spec.stage == "gradient" else []  # the fold's multiplier
            assert [a.name for a in codes_op._schema.arguments] == [a.name for a in schema.arguments] + extra
    if spec.int8_op is not None:
        assert form.int8 or form.int8_why
        assert spec.stage == "forward" or spec.scale is not None  # the portable codes need the scale
    if spec.kind == "quantize" and spec.sampled:  # registered from the description (kernels/ops.py)
        assert spec.math is not None and isinstance(spec.kernel_arg(params), int)
        if cpu.available():
            assert hasattr(cpu.library(), f"nm_{spec.name}")


@pytest.mark.parametrize("spec,rows", VARIANTS, ids=IDS)
def test_every_op_reaches_every_consumer(spec, rows, runs):
    run = runs[spec.name + ("/row" if rows else "")]
    options = options_for(spec, rows)
    # config and its description
    label = spec.label(NMConfig(**options).params_for(spec)) if spec.kind == "quantize" else spec.name
    assert label in NMConfig(**options).describe()
    # the rewrite records it, typed
    applied = [t for r in run.records for t in r.transforms if isinstance(t, Transform) and t.op == spec.name]
    assert applied and all(str(t) == spec.transform_label(t.params, t.where) for t in applied)
    # the graphs hold it, and the node says what it is
    joint = run.graphs[0].joint
    nodes = [n for n in joint.graph.nodes if n.target is spec.op]
    assert nodes
    info = nm_attrs(nodes[0])
    assert info["op"] == spec.name and info["pattern"] == spec.label(info)
    code, _ = graph_code(joint)
    assert f"# <-- nm: {spec.name} {info['pattern']}" in code
    assert spec.color in to_dot(joint, "g0/joint", {})
    styled = [n for n in model_explorer_graph(joint, "g0/joint")["nodes"] if n["id"] == nodes[0].name]
    assert styled[0]["style"]["backgroundColor"] == spec.color
    # the report counts it
    summary = run.report.summary()
    json.loads(run.report.to_json())
    if spec.kind == "prune":
        assert summary["sparse_flop_share"] > 0
    elif spec.stage == "gradient":
        assert summary["quant_flop_share"] > 0
    else:
        fwd = [r for r in run.records if r.role == "fwd" and r.transforms]
        assert fwd and all(tensor_core_speedup(r)[1] == "FP8 TC" for r in fwd)
    # the profiler names its ranges
    annotator = Annotator()
    for entry in run.graphs:
        for kind in ("forward", "backward"):
            if entry.get(kind) is not None:
                annotator(entry.get(kind), kind, entry.index)
    assert any(name.startswith(f"nm::{spec.name} ") for name in annotator.ranges)


@pytest.mark.parametrize("spec,rows", VARIANTS, ids=IDS)
def test_every_op_is_exported_to_onnx(spec, rows, runs):
    pytest.importorskip("onnx")
    from nmcompile.export import to_onnx

    model = to_onnx(runs[spec.name + ("/row" if rows else "")].graphs[0].joint, "g0_joint", strip_stack_traces=True)
    ours = [n for n in model.graph.node if n.domain == "com.nmcompile" and n.op_type == spec.onnx_type]
    per_tensor = spec.kind == "quantize" and not rows  # a quantizer's dim: only where its scales are per row
    # pow2: only where it is set (these runs leave it off)
    expected = set(spec.onnx_attrs) - ({"dim"} if per_tensor else set()) - {"pow2"}
    assert ours and {a.name for a in ours[0].attribute} == expected


@pytest.mark.parametrize("spec,rows", VARIANTS, ids=IDS)
def test_every_rewritten_gemm_gets_a_kernel_or_a_reason(spec, rows):
    """Under lowering="native" an op either feeds a low-precision kernel or its GEMMs say why not."""
    model, x = model_and_input()
    run = run_captured(model, (x,), {**options_for(spec, rows), "lowering": "native"})
    touched = [r for r in run.records if r.transforms and not r.skipped]
    assert touched
    assert all(r.kernel != DENSE_USE or r.kernel_note for r in touched)
    exact = spec.form(example_params(spec))
    if spec.int8_op is not None and exact.int8 and spec.stage == "forward" and int8_cpu_support() is None:
        assert any(r.kernel.spec.codes == "int8" for r in touched if r.role == "fwd")
    if spec.codes_op is not None and exact.float8 is not None and spec.stage == "forward":
        with cpu_reference_kernels():  # FP8 on CPU: the tests' scalar reference
            run = run_captured(model, (x,), {**options_for(spec, rows), "lowering": "native"})
        assert any(r.kernel.spec.float8 for r in run.records if r.transforms and r.role == "fwd")


@pytest.mark.parametrize("spec,rows", [v for v in VARIANTS if v[0].stage == "gradient"],
                         ids=[i for v, i in zip(VARIANTS, IDS) if v[0].stage == "gradient"])
def test_the_noise_monitor_measures_every_gradient_op(spec, rows):
    model, x = model_and_input()
    report = NoiseMonitor(model, options_for(spec, rows), draws=2).measure(x)
    measured = [g for g in report.gemms if any(t.startswith(spec.name) for t in g.transforms)]
    assert measured and all(g.compression_noise is not None for g in measured)


def test_a_kind_or_stage_outside_the_vocabulary_does_not_load():
    import dataclasses

    with pytest.raises(ValueError, match=r"OpSpec 'luq': kind='round' is not one of 'prune', 'quantize'"):
        dataclasses.replace(OPS["luq"], kind="round")
    with pytest.raises(ValueError, match=r"OpSpec 'luq': stage='backward' is not one of 'gradient', 'forward'"):
        dataclasses.replace(OPS["luq"], stage="backward")
    assert dataclasses.replace(OPS["luq"], kind="quantize").kind is Kind.QUANTIZE
    assert json.dumps([OPS["luq"].kind, OPS["sawb"].stage]) == '["quantize", "forward"]'  # reports keep strings


def test_a_description_missing_a_field_does_not_load():
    import dataclasses

    fields = {f.name: getattr(OPS["luq"], f.name) for f in dataclasses.fields(OpSpec)}
    required = [f.name for f in dataclasses.fields(OpSpec) if f.default is dataclasses.MISSING]
    assert {"label", "form", "onnx_type", "onnx_attrs", "color", "options", "schema", "unbiased"} <= set(required)
    for name in required:
        with pytest.raises(TypeError, match=name):
            OpSpec(**{k: v for k, v in fields.items() if k != name})

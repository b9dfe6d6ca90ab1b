"""The ``nmcompile`` CLI: every command as a subprocess on a built-in example and on a factory file,
every error path, and the export / profiling helpers in-process on one captured graph."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

from nmcompile.capture import run_captured
from nmcompile.cli import main
from nmcompile.cli.errors import CLIError
from nmcompile.cli.export import write_onnx
from nmcompile.kernels.gemm import cpu_reference_kernels, int8_cpu_support
from nmcompile.passes.records import GemmRecord, Transform
from nmcompile.report import tensor_core_speedup
from tests.models import MLP

ROOT = pathlib.Path(__file__).resolve().parents[2]
NMCOMPILE = pathlib.Path(sys.executable).with_name("nmcompile")

FACTORY = textwrap.dedent('''
    import torch
    from torch import nn

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
        return model, (torch.randn(8, 16),)

    def broken():
        return nn.Linear(16, 32), (torch.randn(8, 5),)   # wrong input width: fails to run

    def not_a_pair():
        return 42
''')


@pytest.fixture(scope="module")
def factory_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("factory") / "tiny_model.py"
    path.write_text(FACTORY)
    return str(path)


def run_cli(*args, env=None, module=False, cwd=None):
    command = [sys.executable, "-m", "nmcompile", *args] if module else [str(NMCOMPILE), *args]
    full_env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "220", **(env or {})}
    full_env.pop("TORCH_TRACE", None) if not (env and "TORCH_TRACE" in env) else None
    return subprocess.run(command, capture_output=True, text=True, env=full_env, cwd=cwd, timeout=300)


# -- inspect ---------------------------------------------------------------------------------------
def test_inspect_builtin_json_is_only_the_versioned_report():
    result = run_cli("inspect", "mlp", "--json", "--options",
                     '{"sparsity": "2:4", "quant": "luq", "fwd_quant": "sawb"}', module=True)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)  # nothing but JSON on stdout
    assert data["schema"] == "nmcompile.report/6"
    assert data["options"]["sparsity"] == "2:4" and data["options"]["quant"] == "luq"
    gemms = data["gemms"]
    # 3 linear layers: 3 forward GEMMs, 3 wgrad, 2 dgrad (fc1's input needs no gradient)
    assert sorted(g["role"] for g in gemms) == sorted(["fwd"] * 3 + ["wgrad"] * 3 + ["dgrad"] * 2)
    for g in gemms:
        assert g["flops"] == 2 * g["shape"][0] * g["shape"][1] * g["shape"][2]
        if g["role"] == "wgrad":
            assert any(t.startswith("mvue 2:4") for t in g["transforms"]) and "luq4" in g["transforms"]
    assert {g["module"] for g in gemms} == {"fc1", "fc2", "head"}
    assert data["summary"]["sparse_flop_share"] > 0


def test_inspect_noise_table_and_json(factory_file):
    result = run_cli("inspect", "mlp", "--noise", "--options", '{"sparsity": "2:4", "gemms": ["wgrad", "dgrad"]}')
    assert result.returncode == 0, result.stderr
    assert "gradient noise per rewritten backward GEMM" in result.stdout and "stall ratio" in result.stdout
    assert result.stdout.count("mvue 2:4 along K") == 5  # 3 wgrad + 2 dgrad rows
    result = run_cli("inspect", f"{factory_file}:make", "--noise", "--json", "--draws", "3")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["schema"] == "nmcompile.noise/1" and data["draws"] == 3
    (g,) = [g for g in data["gemms"] if g["module"] == "2"]  # wgrad of the last layer (default options)
    assert g["role"] == "wgrad" and g["signal"] > 0 and g["compression_noise"] > 0 and g["minibatch_noise"] > 0
    bad = run_cli("inspect", "mlp", "--noise", "--draws", "1")
    assert bad.returncode == 1 and "--draws must be at least 2" in bad.stderr
    bad = run_cli("inspect", "mlp", "--noise", "--options", '{"fwd_quant": "sawb"}')
    assert bad.returncode == 1 and "no backward GEMM with a compressed gradient" in bad.stderr


def test_inspect_factory_file_human_output(factory_file):
    result = run_cli("inspect", f"{factory_file}:make", "--graph", "backward")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "\x1b[" not in out  # NO_COLOR honoured
    assert "GEMMs" in out and "TC speedup" in out and "wgrad" in out and "mvue 2:4 along K (tokens)" in out
    assert "by module" in out and ("├──" in out or "└──" in out)  # the module tree
    # the backward graph as code, with the inserted nm op marked
    assert "torch.ops.nm.mvue.default" in out
    assert "# <-- nm: mvue 2:4 wgrad" in out
    assert "loading" in result.stderr  # progress goes to stderr


# -- export ----------------------------------------------------------------------------------------
def test_export_onnx_builtin(tmp_path):
    onnx = pytest.importorskip("onnx")
    path = tmp_path / "mlp.onnx"
    result = run_cli("export", "mlp", "--format", "onnx", "-o", str(path), "--options",
                     '{"sparsity": "2:4", "quant": "luq", "fwd_quant": "sawb", "lowering": "emulate"}')
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(path)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    domains = {o.domain: o.version for o in model.opset_import}
    assert domains.get("com.nmcompile") == 1
    nm_nodes = [n for n in model.graph.node if n.domain == "com.nmcompile"]
    kinds = {n.op_type for n in nm_nodes}
    assert kinds == {"MVUE", "LUQ", "SAWB"}
    for node in nm_nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        meta = {p.key: p.value for p in node.metadata_props}
        if node.op_type == "MVUE":
            assert (attrs["n"], attrs["m"]) == (2, 4) and meta["nm.role"] == "wgrad" and meta["nm.pattern"] == "2:4"
            assert len(node.input) == 2  # the gradient and its uniforms
        elif node.op_type == "LUQ":
            assert attrs["bits"] == 4 and attrs["levels"] == b"strict" and meta["nm.role"] in ("wgrad", "dgrad")
        else:
            assert attrs["bits"] == 4 and meta["nm.role"] == "fwd"
        assert meta["nm.module"] in ("fc1", "fc2", "head")
    assert sum(n.op_type == "MVUE" for n in nm_nodes) == 3
    assert any(n.op_type == "Gemm" for n in model.graph.node) and any(n.op_type == "MatMul" for n in model.graph.node)


def test_export_model_explorer_factory(tmp_path, factory_file):
    path = tmp_path / "me.json"
    result = run_cli("export", f"{factory_file}:make", "-f", "model-explorer", "-o", str(path))
    assert result.returncode == 0, result.stderr
    written = result.stdout.split()
    assert written == [str(path), str(tmp_path / "me.density.json"), str(tmp_path / "me.bits.json")]
    collection = json.loads(path.read_text())
    assert {g["id"] for g in collection["graphs"]} == {"g0/joint-before", "g0/joint", "g0/forward", "g0/backward"}
    check_model_explorer(collection)
    density = json.loads((tmp_path / "me.density.json").read_text())
    ids = {g["id"]: {n["id"] for n in g["nodes"]} for g in collection["graphs"]}
    assert density["g0/joint-before"]["results"] == {}
    for graph_id in ("g0/joint", "g0/backward"):
        results = density[graph_id]["results"]
        assert results and set(results) <= ids[graph_id]
        assert {v["value"] for v in results.values()} == {0.5}


def check_model_explorer(collection: dict) -> None:
    """The Model Explorer graph JSON invariants: unique ids, edges to existing nodes, required keys."""
    for graph in collection["graphs"]:
        ids = [n["id"] for n in graph["nodes"]]
        assert len(ids) == len(set(ids))
        for node in graph["nodes"]:
            assert {"id", "label", "namespace", "attrs", "incomingEdges", "outputsMetadata"} <= set(node)
            for edge in node["incomingEdges"]:
                assert edge["sourceNodeId"] in ids
                assert set(edge) == {"sourceNodeId", "sourceNodeOutputId", "targetNodeInputId"}
            for attr in node["attrs"]:
                assert set(attr) == {"key", "value"}
        styled = [n for n in graph["nodes"] if n["label"] == "nm.mvue"]
        if graph["id"].endswith(("/joint", "/backward")):
            assert styled and all("style" in n and n["namespace"] for n in styled)


# -- profile ---------------------------------------------------------------------------------------
def test_profile_builtin_trace_has_annotated_nm_events(tmp_path):
    trace = tmp_path / "trace.json"
    result = run_cli("profile", "mlp", "--steps", "2", "-o", str(trace), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["schema"] == "nmcompile.profile/1" and summary["summary"]["steps"] == 2
    assert summary["annotated_events"] > 0 and summary["summary"]["nm_us"] > 0
    events = json.loads(trace.read_text())["traceEvents"]
    ranges = [e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("nm::mvue 2:4 wgrad")]
    ops = [e for e in events if e.get("cat") == "cpu_op" and e["name"] == "nm::mvue"]
    # 3 wgrad GEMMs, 2 steps
    assert len(ranges) == 6 and len(ops) == 6
    for e in ranges + ops:
        assert (
            e["args"]["role"] == "wgrad"
            and e["args"]["pattern"] == "2:4"
            and e["args"]["module"] in ("fc1", "fc2", "head")
        )
    assert {e["args"]["module"] for e in ops} == {"fc1", "fc2", "head"}


def test_profile_factory_rich_summary_and_torch_trace(tmp_path, factory_file):
    trace = tmp_path / "t.json"
    logs = tmp_path / "torch_trace"
    result = run_cli(
        "profile",
        f"{factory_file}:make",
        "--steps",
        "1",
        "-o",
        str(trace),
        "--options",
        '{"sparsity": "1:2", "gemms": ["wgrad", "dgrad"]}',
        env={"TORCH_TRACE": str(logs)},
    )
    assert result.returncode == 0, result.stderr
    assert "nm ops" in result.stdout and "GEMMs" in result.stdout and "everything else" in result.stdout
    events = json.loads(trace.read_text())["traceEvents"]
    roles = {e["args"]["role"] for e in events if e.get("name") == "nm::mvue"}
    assert roles == {"wgrad", "dgrad"}
    assert all(e["args"]["pattern"] == "1:2" for e in events if e.get("name") == "nm::mvue")
    text = "".join(p.read_text() for p in logs.glob("*.log"))
    for artifact in ("nmcompile_report", "nmcompile_joint_graph", "nmcompile_rewrites"):
        assert text.count(f'"name": "{artifact}"') == 1, artifact  # one graph: logged once, by the pass


# -- errors: one line, non-zero, no traceback (in-process: fast) -----------------------------------
@pytest.mark.parametrize(
    "argv, words",
    [
        (["inspect", "no_such_dir/model.py:make"], "does not exist"),
        (["inspect", "{factory}:nope"], "has no factory 'nope'"),
        (["inspect", "{factory}:not_a_pair"], "must return (model, example_inputs)"),
        (["inspect", "resnet9000"], "unknown target 'resnet9000'"),
        (["inspect", "mlp", "--options", "{sparsity: 2:4"], "--options is neither a recipe's name"),
        (["inspect", "mlp", "--options", "[1, 2]"], "must be a JSON object"),
        (["inspect", "mlp", "--options", "luq5"], "nor JSON"),
        (["inspect", "mlp", "--options", '{"sparsity": "3:2"}'], "sparsity='3:2' is not a valid N:M pattern"),
        (["export", "mlp", "-f", "json", "-o", "missing_dir/x.json"], "output directory"),
        (["profile", "mlp", "--steps", "0"], "--steps must be at least 1"),
    ],
)
def test_errors_are_one_line(argv, words, capsys, factory_file):
    argv = [a.replace("{factory}", factory_file) for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("nmcompile: error: ") and words in lines[-1]
    assert "Traceback" not in err


def test_model_that_fails_to_run(capsys, factory_file):
    assert main(["inspect", f"{factory_file}:broken", "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("nmcompile: error: the model failed to run:") and "Traceback" not in captured.err


def test_debug_shows_the_traceback(capsys, factory_file):
    assert main(["inspect", f"{factory_file}:nope", "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("nmcompile: error:")


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["export", "mlp", "-o", "x.onnx"])  # --format missing
    assert exc.value.code == 2


# -- helpers in-process ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def captured_mlp():
    from nmcompile.capture import run_captured
    from nmcompile.cli.targets import load_target

    model, inputs = load_target("mlp")
    return run_captured(model, inputs, {"sparsity": "2:4", "quant": "luq", "fwd_quant": "sawb"})


def test_native_graphs_export_to_onnx_model_explorer_and_dot_but_float8_not_to_onnx(tmp_path):
    onnx = pytest.importorskip("onnx")
    options = (
        '{"sparsity": "2:4", "gemms": ["wgrad", "dgrad"], "quant": "luq", "fwd_quant": "sawb", "lowering": "native"}'
    )
    int8 = int8_cpu_support() is None
    result = run_cli("inspect", "mlp", "--json", "--options", options)
    kernels = {g["kernel"] for g in json.loads(result.stdout)["gemms"]}
    # the kept first and last layers: a pruned (not quantized) gradient on the 2:4 product, dense forward
    assert kernels == ({"int8"} if int8 else set()) | {"2:4 cpu fp32", "dense"}, kernels
    # int8 graphs (this CPU's): standard ONNX, the integer sums as MatMulInteger
    result = run_cli("export", "mlp", "--format", "onnx", "-o", str(tmp_path / "m.onnx"), "--options", options)
    assert result.returncode == 0, result.stderr
    model = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert any(n.op_type == "MatMulInteger" for n in model.graph.node) == int8
    codes = [n for n in model.graph.node if n.domain == "com.nmcompile" and len(n.output) == 2]  # codes forms
    assert {(n.op_type, onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "codes")))
            for n in codes} == ({("SAWB", b"int8"), ("LUQ", b"int8")} if int8 else set())
    result = run_cli(
        "export", "mlp", "--format", "model-explorer", "-o", str(tmp_path / "me.json"), "--options", options
    )
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "me.json").read_text()
    assert '"gemm.kernel"' in text and ("nm.sawb_int8" in text) == int8
    # float8 graphs (the GPUs'; on CPU only tests choose FP8): the reason, and what to do instead
    with cpu_reference_kernels():
        run = run_captured(MLP((32, 64, 64, 16)), (torch.randn(4, 16, 32),), json.loads(options))
    assert "fp8 e4m3" in {r.kernel for r in run.records}
    with pytest.raises(CLIError, match=r"float8 codes .* \"lowering\": \"emulate\""):
        write_onnx(run.graphs[0].joint, tmp_path / "f.onnx", "g0/joint", "mlp", {}, True, sys.stderr)


def test_onnx_matches_the_fx_graph_numerically(captured_mlp):
    """The standard-op mapping is not just well-typed: ONNX's reference runtime computes the same
    loss and gradients as the FX joint graph it came from (before the rewrite: no custom ops)."""
    pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    from nmcompile.export import to_onnx

    gm = captured_mlp.graphs[0].joint_before
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    torch.manual_seed(0)
    feeds = {}
    for node in placeholders:
        v = node.meta["val"]
        feeds[node.name] = (
            torch.randint(0, v.shape[0] if v.dim() else 8, tuple(v.shape))
            if not v.is_floating_point()
            else torch.randn(tuple(v.shape))
        )
        if not v.is_floating_point() and v.dim() == 1:  # class labels (the mlp target has 8 classes)
            feeds[node.name] = torch.randint(0, 8, tuple(v.shape))
    assert any(not n.meta["val"].is_floating_point() for n in placeholders), "the labels are an input"
    expected = [t for t in gm(*[feeds[n.name] for n in placeholders]) if t is not None]
    model = to_onnx(gm, "mlp")
    got = ReferenceEvaluator(model).run(None, {k: v.numpy() for k, v in feeds.items()})
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(torch.from_numpy(g).to(e.dtype), e, rtol=1e-4, atol=1e-5)


def test_dot_colours_nm_nodes(captured_mlp):
    from nmcompile.capture import records_by_node as _records_by_node
    from nmcompile.export import NM_COLORS, to_dot

    gm = captured_mlp.graphs[0].joint
    dot = to_dot(gm, "g0/joint", _records_by_node(captured_mlp, 0))
    assert dot.startswith('digraph "g0/joint" {') and dot.rstrip().endswith("}")
    mvue_lines = [line for line in dot.splitlines() if line.strip().startswith('"mvue') and "->" not in line]
    assert len(mvue_lines) == 3 and all(NM_COLORS["mvue"] in line for line in mvue_lines)
    assert dot.count("->") == sum(len(n.all_input_nodes) for n in gm.graph.nodes)
    assert 'subgraph cluster_' in dot and 'label="fc2"' in dot


def test_graph_code_marks_every_nm_op(captured_mlp):
    from nmcompile.export import graph_code

    code, marked = graph_code(captured_mlp.graphs[0].joint)
    lines = code.splitlines()
    nm_lines = [i for i, line in enumerate(lines, 1) if "torch.ops.nm." in line]
    assert len(nm_lines) == 3 + 5 + 2  # mvue ×3, luq ×5, sawb ×2
    assert set(nm_lines) <= marked
    for i in nm_lines:
        assert lines[i - 2].strip().startswith("# <-- nm: ")


def test_tensor_core_speedup_rules():
    def rec(role, transforms):
        return GemmRecord(0, "mm", "mm", role, "fc", (64, 64, 64), "float32", transforms)

    def prune(n, m, op="mvue"):
        return Transform(op, {"n": n, "m": m, "dim": 0}, "K (tokens)")

    luq4 = Transform("luq", {"bits": 4, "levels": "strict", "samples": 1})
    sr4 = Transform("sr", {"bits": 4, "samples": 1})

    def sawb4(where):
        return Transform("sawb", {"bits": 4}, where)

    assert tensor_core_speedup(rec("wgrad", [prune(2, 4)]))[0] == 2
    assert tensor_core_speedup(rec("wgrad", [prune(1, 2)]))[0] == 2  # 1:2 is a 2:4 structure
    assert tensor_core_speedup(rec("wgrad", [prune(2, 8, "greedy")]))[0] == 2
    assert tensor_core_speedup(rec("wgrad", [prune(3, 8)]))[0] == 1  # 3:8 is not
    assert tensor_core_speedup(rec("dgrad", [luq4]))[0] == 1  # the other operand is still bf16
    assert tensor_core_speedup(rec("dgrad", [sawb4("W"), luq4])) == (2, "FP8 TC")
    assert tensor_core_speedup(rec("dgrad", [sawb4("W"), sr4])) == (2, "FP8 TC")
    assert tensor_core_speedup(rec("wgrad", [sawb4("X"), prune(2, 4), luq4])) == (4, "2:4 sparse TC + FP8 TC")
    assert tensor_core_speedup(rec("fwd", [sawb4("W,X")]))[0] == 2
    assert tensor_core_speedup(rec("fwd", [])) == (1, "dense bf16")
    assert tensor_core_speedup(rec("wgrad", ["mvue 2:4 along K (tokens)"]))[0] == 1  # a label alone: not modelled


def test_annotate_trace_matches_ops_to_their_range(tmp_path):
    from nmcompile.profiling import annotate_trace, summarize

    info = {"op": "luq", "module": "fc2", "role": "dgrad", "pattern": "luq4", "gemm": "mm_2", "graph": 0, "bits": 4}
    name = "nm::luq luq4 dgrad fc2 [g0/mm_2]"
    events = [
        {"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#0", "pid": 1, "tid": 1, "ts": 0, "dur": 100},
        {"ph": "X", "cat": "user_annotation", "name": name, "pid": 1, "tid": 1, "ts": 10, "dur": 20},
        {"ph": "X", "cat": "cpu_op", "name": "nm::luq", "pid": 1, "tid": 1, "ts": 11, "dur": 18},
        {"ph": "X", "cat": "cpu_op", "name": "nm::luq", "pid": 1, "tid": 2, "ts": 11, "dur": 18},  # other thread
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 1, "tid": 1, "ts": 40, "dur": 30},
        {
            "ph": "X",
            "cat": "cpu_op",
            "name": "aten::mm",
            "pid": 1,
            "tid": 1,
            "ts": 12,
            "dur": 5,
        },  # inside nm: not a GEMM
    ]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": events}))
    assert annotate_trace(str(path), {name: info}) == 2
    out = json.loads(path.read_text())["traceEvents"]
    assert out[1]["args"]["module"] == "fc2" and out[2]["args"]["role"] == "dgrad"
    assert "args" not in out[3]
    s = summarize(str(path))
    assert (s.steps, s.total_us, s.nm_us, s.gemm_us, s.other_us) == (1, 100, 20, 30, 50)

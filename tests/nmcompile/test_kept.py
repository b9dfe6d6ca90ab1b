"""What the backward keeps per backward GEMM (nmcompile/kept.py), read from the captured partitioned graphs.

- every saved tensor is accounted for, once, in a GEMM's ``kept`` or in the report's: their bytes add up to the
  backward's saved inputs;
- under the int8 recipe with recompute, each backward GEMM keeps only int8 codes and their fp32 scales (no fp32
  activation), and the report names the forward GEMMs the backward runs again; without recompute it names none;
- an emulated recipe keeps the fp32 input for its wgrad, with the exact bytes;
- the JSON carries it (schema 6), and the inspect table shows it;
- `explain` (Inductor's partitioner) reports the same as the captured run.
"""
from __future__ import annotations

import torch
from rich.console import Console

from nmcompile.capture import run_captured
from nmcompile.kept import saved_tensors
from nmcompile.recipes import PRESETS
from nmcompile.report import Report, kept_table
from tests.models import MLP

INT8 = {**PRESETS["int8"], "dense_if_faster": False, "keep_first_last": False}  # every layer on int8


def captured(options: dict):
    torch.manual_seed(0)
    return run_captured(MLP((64, 128, 128, 64)), (torch.randn(96, 64),), options)


def test_every_saved_tensor_is_counted_once():
    run = captured(INT8)
    report = run.report
    (entry,) = run.graphs
    saved = saved_tensors(entry.forward, entry.backward)
    names = [k["name"] for g in report.backward for k in g.kept] + [k.name for k in report.kept]
    assert set(names) == set(saved) and len(saved) > 0
    placeholders = [n for n in entry.backward.graph.nodes if n.op == "placeholder" and "tangents" not in n.name]
    total = sum(n.meta["val"].numel() * n.meta["val"].element_size() for n in placeholders
                if isinstance(n.meta["val"], torch.Tensor))
    assert sum(k.bytes for k in saved.values()) == total


def test_int8_with_recompute_keeps_codes_and_scales_only():
    report = captured(INT8).report
    assert {(g.module, g.role) for g in report.backward} == {("fc1", "wgrad"), ("fc2", "dgrad"), ("fc2", "wgrad"),
                                                             ("fc3", "dgrad"), ("fc3", "wgrad")}
    for g in report.backward:
        assert str(g.kernel) == "int8"
        dtypes = sorted(k["dtype"] for k in g.kept)
        assert dtypes == ["float32", "int8"], g.kept  # the operand's codes and their scales
        codes = next(k for k in g.kept if k["dtype"] == "int8")
        scales = next(k for k in g.kept if k["dtype"] == "float32")
        assert scales["bytes"] // 4 * 64 <= codes["bytes"]  # one fp32 scale per row of at least 64 int8 codes
    assert sorted(report.recomputed) == ["fc1", "fc2"]  # their outputs feed the ReLUs' backward; fc3's the loss
    assert not captured({**INT8, "recompute": False}).report.recomputed


def test_an_emulated_wgrad_keeps_its_fp32_input():
    report = captured({"sparsity": "2:4", "lowering": "emulate"}).report
    wgrad = {g.module: g for g in report.backward if g.role == "wgrad"}
    (x,) = wgrad["fc1"].kept
    assert (x["dtype"], tuple(x["shape"]), x["bytes"]) == ("float32", (96, 64), 96 * 64 * 4)
    (h,) = wgrad["fc2"].kept  # relu(fc1(x)), kept as the forward stored it
    assert (h["dtype"], tuple(h["shape"]), h["what"]) == ("float32", (96, 128), "relu")
    (w,) = next(g for g in report.backward if (g.module, g.role) == ("fc2", "dgrad")).kept  # the weight itself
    assert (w["dtype"], tuple(w["shape"]), w["what"]) == ("float32", (128, 128), "input")
    assert report.kept == [] and report.recomputed == []  # ReLU's backward reads the kept relu outputs


def test_the_json_and_the_table_carry_it():
    report = captured(INT8).report
    back = Report.from_json(report.to_json())
    assert [g.kept for g in back.backward] == [g.kept for g in report.backward]
    assert back.kept == report.kept and back.recomputed == report.recomputed
    console = Console(record=True, width=400, color_system=None)
    console.print(kept_table(report, "kept"))
    text = console.export_text()
    assert "int8[128×128] from fc2.absmax_int8" in text and "recomputes the forward GEMMs of" in text
    assert "all saved tensors" in text


def test_explain_under_inductor_reports_what_the_captured_run_keeps():
    """explain() compiles with Inductor; its partitioner's graphs give the same kept tensors, by name and bytes,
    as the captured aot_eager run of the same model and options."""
    from nmcompile.explain import explain

    captured_report = captured(INT8).report
    torch.manual_seed(0)
    explained = explain(MLP((64, 128, 128, 64)), torch.randn(96, 64), **INT8)
    assert [(g.module, g.role, g.kept) for g in explained.backward] == \
        [(g.module, g.role, g.kept) for g in captured_report.backward]
    assert all(g.kept for g in explained.backward)
    assert explained.kept == captured_report.kept and explained.recomputed == captured_report.recomputed != []

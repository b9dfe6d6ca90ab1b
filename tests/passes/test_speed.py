"""``dense_if_faster``: a Linear layer goes on int8 only where the measured costs say int8 is faster.

The costs are the machine's (kernels/timing.py), so these tests fix them: they replace ``layer_costs`` and
check what the pass does with each verdict, whatever this CPU measures. The timing cache itself is tested
in tests/kernels/test_timing.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from nmcompile.capture import run_captured
from nmcompile.kernels.gemm import int8_cpu_support
from nmcompile.passes import speed
from nmcompile.passes.config import NMConfig
from nmcompile.recipes import PRESETS

needs_int8 = pytest.mark.skipif(int8_cpu_support() is not None, reason=f"int8 GEMMs: {int8_cpu_support()}")
OPTIONS = {**PRESETS["int8"], "keep_first_last": False, "dense_if_faster": True, "inner": "aot_eager"}


def _records(monkeypatch, costs, autocast=False):
    """Records of one step of Linear(32, 128) -> GELU -> Linear(128, 32) on 64 tokens, with ``costs(m, n, k,
    dtype)`` as the measured (int8, dense) seconds of each layer."""
    asked = []

    def fake(m, n, k, dtype, config):
        asked.append((m, n, k, dtype))
        return costs(m, n, k, dtype)

    monkeypatch.setattr(speed, "layer_costs", fake)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32))
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        run = run_captured(model, (torch.randn(64, 32),), OPTIONS)
    return run.records, asked


@needs_int8
def test_a_layer_whose_int8_costs_more_stays_dense_with_its_three_gemms_and_says_why(monkeypatch):
    # the up-projection (k = 32) costs more on int8; the down-projection (k = 128) less
    records, asked = _records(monkeypatch, lambda m, n, k, dtype: (2.0, 1.0) if k == 32 else (1.0, 2.0))
    assert sorted(asked) == [(64, 32, 128, torch.float32), (64, 128, 32, torch.float32)]
    linear = [r for r in records if r.op in ("mm", "addmm")]
    up = [r for r in linear if r.module == "0"]  # its forward and its wgrad (the input needs no gradient)
    down = [r for r in linear if r.module == "2"]
    assert len(up) == 2 and all(r.kernel == "dense" and not r.transforms for r in up), up
    assert all("dense is faster on this CPU" in r.skipped and "1e+03 ms in float32, 2e+03 ms on int8" in r.skipped
               for r in up), up
    assert sorted(r.role for r in down) == ["dgrad", "fwd", "wgrad"]
    assert all(r.kernel.spec.codes == "int8" and r.skipped is None for r in down), down


@needs_int8
def test_under_autocast_the_dense_side_is_bf16_and_a_faster_int8_layer_keeps_every_gemm_on_int8(monkeypatch):
    records, asked = _records(monkeypatch, lambda m, n, k, dtype: (1.0, 2.0), autocast=True)
    assert {dtype for *_, dtype in asked} == {torch.bfloat16}
    linear = [r for r in records if r.op in ("mm", "addmm")]
    assert len(linear) == 5 and all(r.kernel.spec.codes == "int8" for r in linear), linear


def test_dense_if_faster_needs_int8_codes_on_both_sides():
    assert NMConfig(**{k: v for k, v in OPTIONS.items() if k != "inner"}).dense_if_faster
    with pytest.raises(ValueError, match=r"dense_if_faster=True .* got fwd_quant=None"):
        NMConfig(quant="sr", bits=8, dense_if_faster=True)
    with pytest.raises(ValueError, match=r"dense_if_faster='yes' must be True or False"):
        NMConfig(dense_if_faster="yes")


def test_the_int8_cost_counts_every_gemm_quantizer_pass_and_rescaling(monkeypatch):
    """layer_costs from stand-in timings: three int_mm and three mm calls at the layer's shapes, the forward
    quantizer over X and W (m·k + n·k elements), the gradient one over m·n elements twice, the rescaling over
    the three outputs."""
    from nmcompile.kernels import timing

    monkeypatch.setattr(timing, "mm_seconds", lambda m, n, k, dtype: m * n * k * 1e-12)
    monkeypatch.setattr(timing, "int_mm_seconds", lambda m, n, k, b_transposed: m * n * k * 1e-13)
    per_element = {"absmax8/row": 1e-9, "sr8/row": 2e-9}  # the preset: per-row scales on both sides
    monkeypatch.setattr(timing, "per_element_seconds",
                        lambda name, dtype, op: per_element.get(name.split(" ")[0], 4e-9))
    m, n, k = 64, 128, 32
    int8, dense = speed.layer_costs(m, n, k, torch.float32, NMConfig(**PRESETS["int8"]))
    assert dense == pytest.approx(3 * m * n * k * 1e-12)
    assert int8 == pytest.approx(3 * m * n * k * 1e-13 + 1e-9 * (m * k + n * k) + 2e-9 * 2 * m * n
                                 + 4e-9 * (m * n + m * k + n * k))


@needs_int8
def test_where_every_layer_is_faster_dense_the_graphs_are_the_plain_ones(monkeypatch):
    """Dense is also the faithful choice: with every layer left dense, the compiled graphs hold no nm op, no int8
    and no float64, as the graph of the same step without the backend's options."""
    monkeypatch.setattr(speed, "layer_costs", lambda m, n, k, dtype, config: (2.0, 1.0))
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32)), torch.randn(64, 32)
    graphs = []
    for options in (OPTIONS, {"inner": "aot_eager"}):
        with torch.autocast("cpu", torch.bfloat16):
            run = run_captured(model, (x,), options)
        graphs.append([(str(n.target), str(getattr(n.meta.get("val"), "dtype", None)))
                       for g in (run.graphs[0].forward, run.graphs[0].backward) for n in g.graph.nodes
                       if n.op == "call_function"])
    nm, plain = graphs
    assert not [t for t, dtype in nm if t.startswith("nm.") or dtype in ("torch.int8", "torch.float64")], nm
    assert sorted(nm) == sorted(plain)

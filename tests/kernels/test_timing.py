"""kernels/timing.py: each cost is measured once per machine and shape, kept on disk, and measured outside
fake tensors and autocast."""
from __future__ import annotations

import json

import torch
import torch._inductor.config as inductor_config
from torch._subclasses.fake_tensor import FakeTensorMode

from nmcompile.kernels import timing


def _fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("NMCOMPILE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(timing, "_memory", {})
    monkeypatch.setattr(timing, "_loaded", set())


def test_a_cost_is_measured_once_and_then_read_from_the_cache_file(monkeypatch, tmp_path):
    _fresh(monkeypatch, tmp_path)
    calls = []
    monkeypatch.setattr(timing, "_median_seconds", lambda fn: calls.append(fn()) or 0.25)
    with FakeTensorMode(), torch.autocast("cpu", torch.bfloat16):  # as while a graph is traced under autocast
        assert timing.mm_seconds(8, 4, 16, torch.float32) == 0.25
        assert timing.mm_seconds(8, 4, 16, torch.float32) == 0.25
    assert len(calls) == 1
    out = calls[0]
    assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == (8, 4)  # real, not autocast
    assert json.loads(timing.cache_file().read_text()) == {"mm 8x4x16 float32": 0.25}
    _fresh(monkeypatch, tmp_path)  # a new process: read from the file, not measured again
    assert timing.mm_seconds(8, 4, 16, torch.float32) == 0.25 and len(calls) == 1


def test_with_caches_disabled_costs_are_measured_once_per_process_and_not_stored(monkeypatch, tmp_path):
    _fresh(monkeypatch, tmp_path)
    calls = []
    monkeypatch.setattr(timing, "_median_seconds", lambda fn: calls.append(1) or 0.5)
    with inductor_config.patch(force_disable_caches=True):
        timing.int_mm_seconds(16, 8, 32, b_transposed=True)
        timing.int_mm_seconds(16, 8, 32, b_transposed=True)
    assert len(calls) == 1 and not timing.cache_file().exists()


def test_per_element_seconds_divide_by_the_elements_timed(monkeypatch, tmp_path):
    _fresh(monkeypatch, tmp_path)
    seen = []
    monkeypatch.setattr(timing, "_median_seconds", lambda fn: seen.append(fn()) or 4.0)
    assert timing.per_element_seconds("neg", torch.int32, torch.neg) == 4.0 / (1 << 22)
    assert seen[0].dtype == torch.int32 and seen[0].numel() == 1 << 22

"""TORCH_TRACE: the nm pass logs what it did inside the compile that ran it, so a plain training step
under ``backend="nm"`` shows the rewrite in tlparse's report next to Inductor's own artifacts; without
TORCH_TRACE nothing is built."""
from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from nmcompile.passes import trace_log

TRAIN = textwrap.dedent('''
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    compiled = torch.compile(model, backend="nm", options={"sparsity": "2:4", "quant": "luq"})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        compiled(torch.randn(8, 16)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
''')


def _tlparse() -> str:
    found = shutil.which("tlparse") or shutil.which("tlparse", path=str(pathlib.Path(sys.executable).parent))
    if found is None:
        pytest.skip("tlparse is not installed (pip install 'nmcompile[viewers]')")
    return found


def test_tlparse_lists_the_nm_artifacts_of_an_inductor_training_step(tmp_path):
    tlparse = _tlparse()
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    logs = tmp_path / "logs"
    env = {**os.environ, "TORCH_TRACE": str(logs), "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}  # the pass must run
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (log,) = logs.glob("*.log")
    out = tmp_path / "tl_out"
    result = subprocess.run([tlparse, str(log), "-o", str(out), "--no-browser"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]

    # One training graph, compiled once: its compile lists our artifacts beside Inductor's.
    directory = json.loads((out / "compile_directory.json").read_text())
    artifacts = {name: entry["artifacts"] for name, entry in directory.items()}
    with_nm = [name for name, arts in artifacts.items() if any(a["name"].startswith("nmcompile_") for a in arts)]
    assert with_nm == ["[0/0]"], with_nm
    names = [a["name"] for a in artifacts["[0/0]"]]
    graph_files = [a["url"] for a in artifacts["[0/0]"] if a["name"].startswith(trace_log.JOINT_GRAPH)]
    rewrite_files = [a["url"] for a in artifacts["[0/0]"] if a["name"].startswith(trace_log.REWRITES)]
    assert len(graph_files) == 1 and len(rewrite_files) == 1, names
    assert any(n.startswith("aot_joint_graph") for n in names) and any(n.startswith("inductor_output_code")
                                                                         for n in names)
    index = (out / "index.html").read_text()
    assert f'href="{graph_files[0]}"' in index and f'href="{rewrite_files[0]}"' in index

    # The rewritten joint graph: a wgrad MVUE for each of the 2 layers, LUQ on 2 wgrad + 1 dgrad.
    code = (out / graph_files[0]).read_text()
    assert code.count("torch.ops.nm.mvue.default(") == 2 and code.count("torch.ops.nm.luq.default(") == 3
    records = json.loads((out / rewrite_files[0]).read_text())
    assert sorted(r["role"] for r in records) == ["dgrad", "fwd", "fwd", "wgrad", "wgrad"]
    for r in records:
        if r["role"] == "wgrad":
            assert r["transforms"] == ["mvue 2:4 along K (tokens)", "luq4"] and r["module"] in ("0", "2")
        elif r["role"] == "dgrad":
            assert r["transforms"] == ["luq4"] and r["module"] == "2"


class _Artifacts(logging.Handler):
    def __init__(self):
        super().__init__()
        self.names = []

    def emit(self, record):
        meta = record.metadata.get("artifact") if hasattr(record, "metadata") else None
        if meta and meta["name"].startswith("nmcompile_"):
            self.names.append(meta["name"])


def _train_step():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    compiled = torch.compile(model, backend="nm", options={"sparsity": "2:4", "inner": "aot_eager"})
    compiled(torch.randn(8, 16)).sum().backward()


def test_without_torch_trace_the_artifacts_are_never_built(monkeypatch, tmp_path):
    from torch._logging._internal import trace_log as torch_trace_log

    monkeypatch.delenv("TORCH_TRACE", raising=False)
    built = []
    code = trace_log._code
    monkeypatch.setattr(trace_log, "_code", lambda graph: built.append(graph) or code(graph))
    _train_step()
    assert built == []

    # The same step under TORCH_TRACE builds and logs both artifacts.
    monkeypatch.setenv("TORCH_TRACE", str(tmp_path))
    handler = _Artifacts()
    torch_trace_log.addHandler(handler)
    try:
        torch._dynamo.reset()
        _train_step()
    finally:
        torch_trace_log.removeHandler(handler)
    assert len(built) == 1 and handler.names == [trace_log.JOINT_GRAPH, trace_log.REWRITES]

"""tools/bench_step_cpu.py --smoke: every configuration compiles, trains, is timed and profiled for memory."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from nmcompile.kernels.gemm import int8_cpu_support

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_smoke_run_measures_every_configuration(tmp_path):
    out = tmp_path / "step.json"
    configs = "inductor fp32,inductor bf16,nm luq4+int8fwd,nm luq4+sawb4 bf16"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_step_cpu.py"), "--smoke", "--configs", configs,
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == configs.split(",")
    for row in rows.values():
        assert len(row["step_times"]) == 2 and row["step_s"] > 0 and row["peak_bytes"] > 0
        assert 0 < row["activation_bytes"] < row["peak_bytes"]  # the peak less parameters, gradients, optimizer state
        assert all(loss == loss for loss in row["losses"])  # finite, not NaN
    assert rows["inductor fp32"]["vs_fp32"] == 1.0 and rows["inductor bf16"]["vs_bf16"] == 1.0
    # the nm configurations ran the blocks' and the input projection's GEMMs on int8 where this CPU can (the
    # head, the model's last layer, stays dense; its first is the embedding)
    kernels = rows["nm luq4+int8fwd"]["kernels"]
    assert kernels.get("int8", 0) == (15 if int8_cpu_support() is None else 0) and kernels["dense"] >= 2
    assert "| nm luq4+int8fwd |" in proc.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_step_cpu.py"), "--configs", "fp64"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown configuration 'fp64'" in bad.stderr

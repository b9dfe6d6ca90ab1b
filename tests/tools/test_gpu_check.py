"""tools/gpu_check.sh, end to end on CPU: the GPU parts skip or run their smoke variants."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_gpu_check_runs_end_to_end_without_a_gpu(tmp_path):
    # LIMIT_SCALE: the device's time limits, tripled, so that a loaded CPU is not mistaken for a broken step
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "unused"), "LIMIT_SCALE": "3"}
    out = tmp_path / "results"
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=1500)
    failed = [line for line in proc.stdout.splitlines() if line.startswith("!!")]  # the steps that failed, by name
    assert proc.returncode == 0, "\n".join(failed) + "\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.stat().st_size < 16 << 20 for p in out.iterdir()), files
    assert {"env.json", "cuda_tests.log", "bench_gemm.json", "bench_train.json"} <= set(files), files
    gemm = json.loads((out / "bench_gemm.json").read_text())
    assert {r["variant"] for r in gemm["rows"]} >= {"dense", "fp8+quant", "2:4+prune", "2:4 fp8+prune+quant", "copy"}
    assert not any("error" in r for r in gemm["rows"]), [r for r in gemm["rows"] if "error" in r]
    train = json.loads((out / "bench_train.json").read_text())
    native = [r for r in train["results"] if r["name"] != "inductor"]
    assert native and all("error" not in r for r in train["results"])
    assert all(r["kernels"] and "dense" not in r["kernels"] for r in native), "smoke runs lowering='native' on CPU"
    log = (out / "cuda_tests.log").read_text()
    assert "skipped" in log and " passed" in log and "failed" not in log, log[-2000:]
    assert "== done in" in proc.stdout

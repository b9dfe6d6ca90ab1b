"""tools/reproduce_lm.py --quick: the byte-level GPT trains under each quick recipe and writes its results."""
from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import reproduce_lm  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "reproduce_lm.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, out


def test_quick_run_trains_every_recipe_and_measures_the_noise(quick):
    stdout, out = quick
    results = json.loads((out / "results_lm.json").read_text())
    assert list(results["runs"]) == reproduce_lm.QUICK
    assert results["corpus"]["files"] > 100 and results["corpus"]["validation_files"] > 0
    for name, seeds in results["runs"].items():
        (run,) = seeds.values()
        assert not run["diverged"] and run["curve"][-1][0] == results["args"]["steps"]
        # untrained: ~8 bits per byte (uniform over 256); a few steps already below it
        assert math.isfinite(run["final_bpb"]) and 2.0 < run["final_bpb"] < 8.0
        assert bool(run["noise"]) == (name != "dense")
    mvue = results["runs"]["mvue 2:4"]["0"]["noise"][0]["summary"]["wgrad"]
    assert mvue["compression_noise"] > 0 and mvue["minibatch_noise"] > 0
    fnt = results["runs"]["luq4 + sawb4"]["0"]["fnt"]
    assert fnt["steps"] >= 1 and math.isfinite(fnt["final_bpb"]) and math.isfinite(fnt["final_bpb_fp_forward"])
    assert "| luq4 + sawb4, FNT last 10% |" in stdout and "wgrad E‖Ĝ−G‖²/minibatch var" in stdout
    for png in ("reproduce_lm_bpb.png", "reproduce_lm_noise.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tables_redraw_from_the_saved_json(quick, tmp_path):
    _, out = quick
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "reproduce_lm.py"), "--tables-from",
                           str(out / "results_lm.json"), "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| mvue 2:4 |" in proc.stdout and (tmp_path / "reproduce_lm_bpb.png").exists()


def test_unknown_recipe_is_named():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "reproduce_lm.py"), "--recipes", "mvue 3:4"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown recipe(s) ['mvue 3:4']" in proc.stderr

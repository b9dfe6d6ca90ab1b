"""tools/long_run.py --quick: resumable runs, the FNT phases, the switch and the end-to-end noise, in seconds."""
from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import long_run  # noqa: E402


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "long_run.py"), "--quick", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """Three sessions into one folder: a budget of 0 minutes runs one run and stops; the next does the rest;
    the last finds nothing to do."""
    out = tmp_path_factory.mktemp("long")
    sessions = [run("--out", str(out), *budget) for budget in (["--budget-minutes", "0"], [], [])]
    for proc in sessions:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return sessions, json.loads((out / "results_long.json").read_text()), out


def test_runs_resume_where_the_last_session_stopped(quick):
    sessions, results, out = quick
    assert "3 run(s) to do, 0 already" in sessions[0].stdout and "rerun to go on" in sessions[0].stdout
    assert "2 run(s) to do, 1 already" in sessions[1].stdout and "0 run(s) to do, 3 already" in sessions[2].stdout
    assert [s["runs"] for s in results["sessions"]] == [[["dense", 0]], [[long_run.FNT_OF, 0], [long_run.SWITCHED, 0]]]
    assert list(results["runs"]) == long_run.QUICK and (out / "long_run.png").stat().st_size > 0


def test_every_run_has_its_measurements(quick):
    _, results, _ = quick
    runs = {name: seeds["0"] for name, seeds in results["runs"].items()}
    for name, r in runs.items():
        assert not r["diverged"] and r["steps"] == math.ceil(0.5 * r["params"] / (16 * 128))
        assert 2.0 < r["final_bpb"] < 8.0 and r["curve"][-1][0] == r["steps"]
        assert ("end_to_end" in r) == (name != "dense")
    fixed = runs[long_run.FNT_OF]
    assert fixed["noise"] and {"fnt", "same", "steps"} <= set(fixed["extra"])
    assert {p["name"] for p in fixed["end_to_end"]} >= {"head.weight", "blocks.0.attn.qkv.weight"}
    switched = runs[long_run.SWITCHED]["switch"]  # --quick sets a threshold it must cross at once
    assert switched["events"][0]["to"] == {"fwd_quant": "sawb", "inner": "aot_eager"}
    assert len(switched["measurements"]) == 2


def test_other_settings_do_not_mix_into_saved_runs(quick):
    _, _, out = quick
    proc = run("--out", str(out), "--d", "32")
    assert proc.returncode == 2 and "other settings" in proc.stderr

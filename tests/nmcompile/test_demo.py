"""`nmcompile demo --quick`: every method trains, the table, the PNG and the JSON come out."""
import argparse
import json
import math

import pytest

from nmcompile import demo

METHOD_NAMES = [name for name, _ in demo.METHODS]


def parse(*argv):
    return demo.add_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_defaults():
    args = parse()
    assert args.out == "nm-demo" and not args.quick and args.seeds is None  # the preset's: 0 1 2, --quick 0


def test_method_list_covers_the_issue():
    opts = dict(demo.METHODS)
    assert opts["dense"] == {}
    assert opts["mvue 2:4"] == {"sparsity": "2:4"}
    assert opts["mvue 1:2"] == {"sparsity": "1:2"}
    assert opts["greedy 2:4"]["method"] == "greedy"
    assert opts["mvue 2:4 wgrad+dgrad"] == {"sparsity": "2:4", "gemms": ["wgrad", "dgrad"]}
    assert opts["greedy 2:4 wgrad+dgrad"] == {"sparsity": "2:4", "method": "greedy", "gemms": ["wgrad", "dgrad"]}
    assert demo.DEFAULT["seeds"] == [0, 1, 2]
    assert opts["luq4 smp2 + sawb4"] == {"quant": "luq", "smp": 2, "fwd_quant": "sawb"}
    assert opts["mvue 2:4 + luq4"] == {"sparsity": "2:4", "quant": "luq"}
    assert opts["sr4 smp2 + sawb4"] == {"quant": "sr", "smp": 2, "fwd_quant": "sawb"}  # LUQ vs uniform SR


@pytest.mark.parametrize("argv,message", [(["--hidden", "30"], "--hidden=30 must be a positive multiple of 4"),
                                          (["--batch-size", "30"], "--batch-size=30 must be a positive multiple of 4"),
                                          (["--epochs", "0"], "--epochs=0 must be >= 1"),
                                          (["--methods", "dense,nope"], "unknown method 'nope'"),
                                          (["--seeds", "1", "1"], "--seeds 1 1 repeats a seed")])
def test_bad_arguments_fail_before_training(argv, message, tmp_path):
    args = parse("--quick", "--out", str(tmp_path), *argv)  # parses: the refusal is the demo's own
    with pytest.raises(SystemExit, match=message):
        demo.main(args)
    assert not (tmp_path / "results.json").exists()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    capture = pytest.MonkeyPatch()
    import io
    import sys

    buf = io.StringIO()
    capture.setattr(sys, "stdout", buf)
    try:
        status = demo.main(parse("--quick", "--epochs", "2", "--hidden", "32", "--seeds", "0", "1", "--out", str(out)))
    finally:
        capture.undo()
    return status, buf.getvalue(), out


def test_quick_demo_runs_every_method(quick_run):
    status, stdout, out = quick_run
    assert status == 0
    first_cells = {line.strip("│┃ ").split("│")[0].strip() for line in stdout.splitlines()}
    for name in METHOD_NAMES:  # a table row per method (first cell exactly: names are prefixes of others)
        assert name in first_cells, (name, stdout)
    for header in ("test acc", "after epoch 2", "final loss", "grad var", "grad bias²", "wall s", "sparse bwd",
                   "4-bit bwd"):
        assert header in stdout
    assert "mean ± std over 2 seeds" in stdout and stdout.count(" ± ") >= 3 * len(METHOD_NAMES)


def test_quick_demo_writes_a_valid_png(quick_run):
    _, _, out = quick_run
    png = out / "curves.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_quick_demo_results_json(quick_run):
    _, _, out = quick_run
    results = json.loads((out / "results.json").read_text())
    assert results["schema"] == "nmcompile.demo/3"
    assert results["config"]["quick"] is True and results["config"]["inner"] == "aot_eager"
    assert results["config"]["seeds"] == [0, 1]
    assert list(results["runs"]) == METHOD_NAMES
    assert all([r["seed"] for r in m["seeds"]] == [0, 1] for m in results["runs"].values())
    runs = {name: m["seeds"][0] for name, m in results["runs"].items()}
    spe = results["config"]["steps_per_epoch"]
    for name, r in runs.items():
        assert r["steps"] == 2 * spe and len(r["curves"]["step_loss"]) == 2 * spe
        assert math.isfinite(r["final_loss"]) and 0.0 <= r["test_acc"] <= 1.0
        assert r["wall_s"] > 0
        assert r["options"]["inner"] == "aot_eager"
    # one epoch on digits is well above chance (10%) for the dense model
    assert runs["dense"]["test_acc"] > 0.25
    # learning happened: late-epoch loss below the first steps' loss
    assert runs["dense"]["final_loss"] < runs["dense"]["curves"]["step_loss"][0]


def test_quick_demo_flop_shares_match_the_methods(quick_run):
    _, _, out = quick_run
    runs = {name: m["seeds"][0] for name, m in json.loads((out / "results.json").read_text())["runs"].items()}
    assert runs["dense"]["sparse_flop_share"] == 0 and runs["dense"]["luq_flop_share"] == 0
    for name in ("mvue 2:4", "mvue 1:2", "greedy 2:4"):
        assert 0 < runs[name]["sparse_flop_share"] <= 1 and runs[name]["luq_flop_share"] == 0
    assert runs["luq4 smp2 + sawb4"]["sparse_flop_share"] == 0
    assert runs["luq4 smp2 + sawb4"]["luq_flop_share"] == pytest.approx(1.0)
    assert runs["mvue 2:4 + luq4"]["sparse_flop_share"] > 0
    assert runs["mvue 2:4 + luq4"]["luq_flop_share"] == pytest.approx(1.0)
    assert runs["sr4 smp2 + sawb4"]["luq_flop_share"] == 0  # SR is a quantized gradient, not LUQ
    assert runs["sr4 smp2 + sawb4"]["quant_flop_share"] == pytest.approx(1.0)
    for name, run in runs.items():
        if name.startswith(("luq", "mvue 2:4 + luq")):
            assert run["quant_flop_share"] == run["luq_flop_share"], name


def test_quick_demo_runs_differ_only_by_method(quick_run):
    """Seed reset per run: same initial weights and same first batch, so the first loss (computed
    before any gradient transform acts) is identical for every method with a high-precision forward."""
    _, _, out = quick_run
    runs = {name: m["seeds"][0] for name, m in json.loads((out / "results.json").read_text())["runs"].items()}
    first = {name: r["curves"]["step_loss"][0] for name, r in runs.items()}
    for name in METHOD_NAMES:
        if "fwd_quant" not in runs[name]["options"]:
            assert first[name] == pytest.approx(first["dense"], rel=1e-6), name
    # the forward-quantized run sees the same batch through 4-bit GEMMs: close, but not identical
    assert first["luq4 smp2 + sawb4"] != first["dense"]
    assert first["luq4 smp2 + sawb4"] == pytest.approx(first["dense"], rel=0.2)
    # and the gradient transforms do change the trajectory
    assert runs["greedy 2:4"]["curves"]["step_loss"][1:] != runs["dense"]["curves"]["step_loss"][1:]


def test_quick_demo_seeds_differ_and_the_noise_separates_variance_from_bias(quick_run):
    _, _, out = quick_run
    runs = json.loads((out / "results.json").read_text())["runs"]
    first, second = runs["dense"]["seeds"]
    assert first["curves"]["step_loss"][0] != second["curves"]["step_loss"][0]  # other weights, other batches
    assert runs["dense"]["noise"] is None and runs["luq4 smp2 + sawb4"]["noise"]["compression_noise"] > 0
    for name in ("greedy 2:4", "greedy 2:4 wgrad+dgrad"):  # deterministic: all of the error is bias
        noise = runs[name]["noise"]
        assert noise["compression_variance"] == 0 and noise["compression_bias"] > 0
        assert noise["compression_bias"] == pytest.approx(noise["compression_noise"])
    for name in ("mvue 2:4", "mvue 2:4 wgrad+dgrad"):  # unbiased: the error is the variance, up to sampling
        noise = runs[name]["noise"]
        assert noise["compression_variance"] > 0
        assert abs(noise["compression_bias"]) < noise["compression_variance"]


def _pretend_missing(monkeypatch, name):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: None if mod == name else find_spec(mod, *a))


def test_without_matplotlib_the_results_are_written_and_no_png(monkeypatch, tmp_path, capsys):
    _pretend_missing(monkeypatch, "matplotlib")
    demo.main(parse("--quick", "--epochs", "1", "--hidden", "32", "--methods", "dense", "--out", str(tmp_path)))
    captured = capsys.readouterr()
    assert (tmp_path / "results.json").exists() and not (tmp_path / "curves.png").exists()
    assert captured.err.count("matplotlib is not installed") == 1 and "nmcompile[demo]" in captured.err


def test_without_scikit_learn_it_stops_before_training_and_says_what_to_install(monkeypatch, tmp_path):
    _pretend_missing(monkeypatch, "sklearn")
    with pytest.raises(SystemExit, match=r"pip install 'nmcompile\[demo\]'"):
        demo.main(parse("--quick", "--out", str(tmp_path)))
    assert not (tmp_path / "results.json").exists()

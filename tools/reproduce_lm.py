"""A byte-level GPT on Python's own standard-library sources, trained with each compression recipe.

    python tools/reproduce_lm.py                     # 3 seeds, every recipe: the numbers in docs/results.md §4
    python tools/reproduce_lm.py --quick             # smoke test: 1 seed, 3 recipes, 12 steps (CI)
    python tools/reproduce_lm.py --tables-from docs/results_lm.json   # re-print tables, redraw plots

Model: 2 blocks, d=128, 4 heads, context 128 bytes, causal attention through
``F.scaled_dot_product_attention`` under the math SDPA backend, so its GEMMs are rewritten too. Data: the
``.py`` files of the running Python's standard library (tests excluded), split into train and validation by
file (a stable hash of the path). Every run: AdamW, warm-up then cosine LR, ``torch.compile(backend="nm",
options={..., "inner": "aot_eager"})`` (the same rewritten graphs as with Inductor, run eagerly: Inductor's
compile time would dominate on a CPU). Within a seed, runs differ only by the backend options.

Validation bits per byte are measured with the forward the model trained with (the compiled graph, so a
SAWB-4 forward is scored quantized) and, for those, also with a float forward. The gradient-noise monitor
(``nmcompile.NoiseMonitor``) measures each recipe every ``--noise-every`` steps on the training batch
(for the seeds in ``--noise-seeds``) without changing the run.
Writes results_lm.json, reproduce_lm_bpb.png and reproduce_lm_noise.png to --out; tables to stdout.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import nmcompile
from nmcompile.demo.environment import environment
from nmcompile.fnt import fnt_options
from nmcompile.noise import stall_ratio
from nmcompile.passes.config import NMConfig
from nmcompile.passes.roles import Role
from nmcompile.recipes import options_of

from lm import plots  # tools/lm: the LM tools' shared parts
from lm.corpus import lm_data
from lm.train import adamw, add_training_arguments, bits_per_byte, branch, byte_gpt, lr_at, train

RECIPES = options_of(["dense", "mvue 1:2", "mvue 2:4", "mvue 2:4 wgrad+dgrad", "greedy 2:4", "greedy 2:4 wgrad+dgrad",
                      "luq4", "sr4", "luq4 smp2", "luq4 + sawb4", "luq4 + absmax8", "mvue 2:4 + luq4"])
FNT_OF = "luq4 + sawb4"  # the recipe whose last --fnt-fraction of steps is also run as FNT
FNT_NAME = "luq4 + sawb4, FNT last 10%"
QUICK = ["dense", "mvue 2:4", "luq4 + sawb4"]


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- training
def train_run(name: str, options: dict, seed: int, data: dict, args, fnt: bool = False) -> dict:
    """One run of ``name``; with ``fnt`` also the FNT branch from the state at 1 − fnt_fraction of the steps."""
    model = byte_gpt(seed, args)
    opt = adamw(model, lr_at(0, args))
    opts = {**options, "inner": "aot_eager"}
    compiled = torch.compile(model, backend="nm", options=opts)
    monitor = None
    if seed in args.noise_seeds and NMConfig.from_options(options)[0].compresses_gradients:
        monitor = nmcompile.NoiseMonitor(model, options, every=args.noise_every, seed=seed)
    branch_at = args.steps - int(round(args.fnt_fraction * args.steps)) if fnt else None
    out, snapshot = train(model, compiled, opt, data, args, torch.Generator().manual_seed(seed), monitor=monitor,
                          snapshot_at=branch_at)
    if options.get("fwd_quant"):
        out["final_bpb_fp_forward"] = bits_per_byte(model, data["val"])
    if snapshot is not None:  # the rest of the schedule as FNT: backward in high precision, forward still SAWB-4
        steps = args.steps - branch_at
        fnt_model = branch(model, snapshot, fnt_options(opts), steps, data, args)
        out["fnt"] = {"final_bpb": bits_per_byte(fnt_model, data["val"]),
                      "final_bpb_fp_forward": bits_per_byte(model, data["val"]), "steps": steps}
    return out


# ----------------------------------------------------------------------------- reporting
def mean_std(values: list) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values: list, digits: int = 3) -> str:
    m, s = mean_std(values)
    return "–" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def rows(results: dict) -> list:
    """(name, per-seed final bpb, per-seed fp-forward bpb, per-seed bpb at the middle of training, diverged)."""
    out = []
    for name, runs in results["runs"].items():
        seeds = list(runs.values())
        mid = [r["curve"][len(r["curve"]) // 2][1] for r in seeds]
        out.append((name, [r["final_bpb"] for r in seeds], [r.get("final_bpb_fp_forward") for r in seeds], mid,
                    sum(r["diverged"] for r in seeds)))
        if any("fnt" in r for r in seeds):
            fnt = [r["fnt"] for r in seeds if "fnt" in r]
            out.append((FNT_NAME, [f["final_bpb"] for f in fnt], [f["final_bpb_fp_forward"] for f in fnt], [], 0))
    return out


def noise_summary(results: dict) -> dict:
    """Per recipe, over the monitor's measurements after step 0 (all monitored seeds): the means of the
    per-role ratios, the median stall ratio of the update GEMMs and the share of measurements below 1."""
    out = {}
    for name, runs in results["runs"].items():
        points = [p for r in runs.values() for p in r.get("noise", []) if p["step"] > 0]
        if not points:
            continue
        entry = {"measurements": len(points)}
        for role in (Role.WGRAD, Role.DGRAD):
            sums = [p["summary"][role] for p in points if role in p["summary"]]
            if not sums:
                continue
            entry[f"{role}_noise_to_signal"] = statistics.fmean(s["compression_noise"] / s["signal"] for s in sums)
            entry[f"{role}_bias_to_signal"] = statistics.fmean(s["compression_bias"] / s["signal"] for s in sums)
            if role == Role.WGRAD:
                entry["wgrad_noise_to_minibatch"] = statistics.fmean(s["compression_noise"] / s["minibatch_noise"]
                                                                     for s in sums)
                entry["minibatch_to_signal"] = statistics.fmean(s["minibatch_noise"] / s["signal"] for s in sums)
                stall = [r for s in sums
                         if (r := stall_ratio(s["signal"] - s["minibatch_noise"], s["compression_noise"])) is not None]
                if stall:
                    entry["wgrad_stall_ratio"] = statistics.median(stall)
                    entry["wgrad_stall_below_1"] = sum(x < 1 for x in stall) / len(stall)
        out[name] = entry
    return out


def print_tables(results: dict) -> None:
    dense = results["runs"].get("dense")
    dense_final = [r["final_bpb"] for r in dense.values()] if dense else []
    log("\n| recipe | val bits/byte, final | Δ vs dense (same seed) | val bpb at mid-training | float forward | "
        "diverged |")
    log("|---|---|---|---|---|---|")
    for name, final, fp, mid, div in rows(results):
        delta = [f - d for f, d in zip(final, dense_final)] if dense_final and len(final) == len(dense_final) else []
        fp = [v for v in fp if v is not None]
        log(f"| {name} | {fmt(final)} | {fmt(delta) if name != 'dense' else '–'} | {fmt(mid)} | "
            f"{fmt(fp) if fp else '–'} | {div}/{len(final)} |")
    noise = noise_summary(results)
    if noise:
        log("\n| recipe | wgrad E‖Ĝ−G‖²/‖G‖² | of it bias² | wgrad E‖Ĝ−G‖²/minibatch var | minibatch var/‖G‖² | "
            "stall ratio, median (share < 1) | dgrad E‖Ĝ−G‖²/‖G‖² |")
        log("|---|---|---|---|---|---|---|")
        for name, e in noise.items():
            def cell(key):
                return "–" if e.get(key) is None else f"{e[key]:.3g}"

            stall = "–" if "wgrad_stall_ratio" not in e else (f"{e['wgrad_stall_ratio']:.3g} "
                                                               f"({e['wgrad_stall_below_1']:.0%})")
            log(f"| {name} | {cell('wgrad_noise_to_signal')} | {cell('wgrad_bias_to_signal')} | "
                f"{cell('wgrad_noise_to_minibatch')} | {cell('minibatch_to_signal')} | {stall} | "
                f"{cell('dgrad_noise_to_signal')} |")


def plot(results: dict, out: pathlib.Path) -> None:
    plt = plots.pyplot()

    runs = results["runs"]
    colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(runs)}
    sparsity = ["dense", "mvue 1:2", "mvue 2:4", "mvue 2:4 wgrad+dgrad", "greedy 2:4", "greedy 2:4 wgrad+dgrad"]
    groups = [sparsity, ["dense"] + [name for name in runs if name not in sparsity]]  # the rest: quantized
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, names, title in zip(axes, groups, ("gradient sparsity", "quantized")):
        for name in names:
            if name not in runs:
                continue
            curves = [r["curve"] for r in runs[name].values() if not r["diverged"]]
            steps = [s for s, _ in curves[0]]
            vals = torch.tensor([[v for _, v in c] for c in curves])
            m = vals.mean(0)
            s = vals.std(0) if len(curves) > 1 else torch.zeros_like(m)
            ax.plot(steps, m, label=name, lw=1.5, ls="--" if name == "dense" else "-", color=colours[name])
            ax.fill_between(steps, m - s, m + s, alpha=0.15, color=colours[name])
        ax.set_title(f"{title}: validation bits/byte (mean ± std over seeds)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("bits per byte")
    lo = min(min(v for _, v in r["curve"]) for rs in runs.values() for r in rs.values() if not r["diverged"])
    axes[0].set_ylim(lo - 0.1, lo + 1.5)
    plots.save(fig, out / "reproduce_lm_bpb.png", 90)

    noise = {n: [p for r in rs.values() for p in r.get("noise", [])] for n, rs in runs.items()}
    noise = {n: p for n, p in noise.items() if p}
    if not noise:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, points in noise.items():
        by_step: dict = {}
        for p in points:
            w = p["summary"].get(Role.WGRAD)
            if w and w["minibatch_noise"] and w["compression_noise"] > 0:
                by_step.setdefault(p["step"], []).append(w["compression_noise"] / w["minibatch_noise"])
        if by_step:
            steps = sorted(by_step)
            axes[0].plot(steps, [statistics.fmean(by_step[s]) for s in steps], marker="o", ms=3, label=name,
                         ls="--" if "wgrad+dgrad" in name else "-", color=colours[name])
    axes[0].axhline(1, color="k", lw=0.8)
    axes[0].set_yscale("log")
    axes[0].set_title("update GEMMs: E‖Ĝ−G‖² / minibatch variance (mean over seeds)")
    axes[0].set_xlabel("step")
    axes[0].grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7, ncol=2, loc="lower right")
    summary = noise_summary(results)
    dense = {seed: r["final_bpb"] for seed, r in runs.get("dense", {}).items()}
    for name, e in summary.items():
        ratio = e.get("wgrad_noise_to_minibatch")
        deltas = [r["final_bpb"] - dense[s] for s, r in runs[name].items() if s in dense]
        if ratio is None or not deltas:
            continue
        m, s = mean_std(deltas)
        axes[1].errorbar([ratio], [m], yerr=[s], fmt="o", capsize=3, color=colours[name], label=name)
    axes[1].set_xscale("log")
    axes[1].set_yscale("symlog", linthresh=0.01)  # the unbiased recipes' small gaps and greedy's large ones
    axes[1].legend(fontsize=7, loc="lower right")
    axes[1].axhline(0, color="k", lw=0.8)
    axes[1].set_title("final Δ bits/byte vs dense against the mean noise ratio")
    axes[1].set_xlabel("update GEMMs: E‖Ĝ−G‖² / minibatch variance (mean over training)")
    axes[1].set_ylabel("Δ bits per byte (mean ± std over seeds)")
    axes[1].grid(alpha=0.3, which="both")
    plots.save(fig, out / "reproduce_lm_noise.png", 90)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"1 seed, {', '.join(QUICK)}, 12 steps (a smoke test)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", metavar="NAME", help="a subset of the recipes (default: all)")
    parser.add_argument("--steps", type=int, default=250)
    add_training_arguments(parser, d=128, warmup=0.1, every=25)
    parser.add_argument("--noise-seeds", type=int, nargs="*", default=None,
                        help="seeds whose runs the noise monitor measures (default: all)")
    parser.add_argument("--out", default="docs", help="where results_lm.json and the PNGs go")
    parser.add_argument("--tables-from", metavar="JSON", help="print tables and redraw plots from saved results")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    if args.tables_from:
        results = json.loads(pathlib.Path(args.tables_from).read_text())
        out.mkdir(parents=True, exist_ok=True)
        print_tables(results)
        plot(results, out)
        return 0
    known = [n for n, _ in RECIPES]
    names = args.recipes or known
    if args.quick:
        args.seeds, args.steps, args.eval_every, args.noise_every, args.eval_batches = [0], 12, 6, 6, 2
        names = args.recipes or QUICK
    bad = [n for n in names if n not in known]
    if bad:
        parser.error(f"unknown recipe(s) {bad}; choose from {known}")
    if args.steps < 1 or args.batch < 2 or args.eval_every < 1 or args.noise_every < 1:
        parser.error("--steps, --eval-every and --noise-every must be >= 1 and --batch >= 2")
    if not 0 < args.fnt_fraction < 1:
        parser.error(f"--fnt-fraction must be in (0, 1), got {args.fnt_fraction}")
    if args.noise_seeds is None:
        args.noise_seeds = list(args.seeds)
    out.mkdir(parents=True, exist_ok=True)

    data, corpus = lm_data(args.batch, args.block, args.eval_batches)
    log(f"data: {corpus['files']} stdlib files ({corpus['validation_files']} for validation), "
        f"{corpus['train_bytes'] / 1e6:.1f} MB train / {corpus['validation_bytes'] / 1e6:.1f} MB validation; "
        f"{args.steps} steps × {args.batch}×{args.block} bytes = "
        f"{args.steps * args.batch * args.block / 1e6:.2f} MB seen")
    results = {"environment": {**environment(), "nmcompile": nmcompile.__version__},
               "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
               "args": vars(args), "corpus": corpus, "runs": {}}
    start = time.perf_counter()
    options = dict(RECIPES)
    with sdpa_kernel(SDPBackend.MATH):
        for name in names:
            results["runs"][name] = {}
            for seed in args.seeds:
                run = train_run(name, options[name], seed, data, args, fnt=(name == FNT_OF))
                results["runs"][name][seed] = run
                extra = f", FNT {run['fnt']['final_bpb']:.3f}" if "fnt" in run else ""
                log(f"  {name:24s} seed {seed}: val {run['final_bpb']:.3f} bits/byte{extra}"
                    f"{' DIVERGED' if run['diverged'] else ''} ({run['wall_s']:.0f} s)")
    results["wall_s"] = time.perf_counter() - start
    (out / "results_lm.json").write_text(json.dumps(results, indent=1))
    print_tables(results)
    plot(results, out)
    log(f"\nwall {results['wall_s']:.0f} s; wrote {out / 'results_lm.json'}, {out / 'reproduce_lm_bpb.png'}, "
        f"{out / 'reproduce_lm_noise.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

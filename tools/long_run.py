"""The long run: does gradient compression hold at 20+ bytes of training text per parameter?

    python tools/long_run.py                         # every recipe, 2 seeds: docs/results_long.json (resumable)
    python tools/long_run.py --budget-minutes 60     # stop starting runs after an hour; rerun to go on
    python tools/long_run.py --quick --out /tmp/x    # smoke test (CI): seconds
    python tools/long_run.py --tables-from docs/results_long.json   # tables and plots from saved results

The byte-level GPT of the LM tools (``tools/lm``; the data of ``tools/reproduce_lm.py``: Python's standard-library
sources, split by file), made small enough that 20 bytes per parameter fit a CPU session: 2 blocks, d = 64, 4 heads,
context 128. Every run: AdamW, warm-up then cosine LR, ``torch.compile(backend="nm")`` with Inductor and the
default lowering (exact int8 GEMMs where the recipe's operands allow), attention through the math SDPA kernel so
its GEMMs are compressed too. The noise monitor measures every ``--noise-every`` steps; at the end, the end-to-end
noise of every parameter tensor (``nmcompile.end_to_end_noise``).

Besides the fixed recipes:
- **FNT** (LUQ paper §5.2): the ``luq4 + sawb4`` runs go on after their full schedule for ``--fnt-fraction``
  more steps with a high-precision backward (forward still SAWB4, LR along Eq. 17), next to the same extra
  steps in 4 bits with the same LR: the same number of steps either way.
- **Switch**: ``luq4 + sawb4`` under ``nmcompile.PrecisionSwitch``, which moves to the FNT recipe (high-
  precision backward, forward still SAWB4) once ‖∇L‖²/(3·E‖Ĝ−G‖²) of the update GEMMs over its recent
  measurements stays below 1; and ``luq4``, which moves to dense training.

Resumable: each finished (recipe, seed) is written to ``--out`` at once, and a rerun with the same settings
skips it; ``--budget-minutes`` stops before a run that would not finish in the budget.
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
from nmcompile.noise import windowed_stall_ratio
from nmcompile.passes.config import NMConfig
from nmcompile.passes.roles import Role
from nmcompile.recipes import options_of

from lm import plots  # tools/lm: the LM tools' shared parts
from lm.corpus import lm_data, random_batch
from lm.train import Snapshot, adamw, add_training_arguments, bits_per_byte, branch, byte_gpt, lr_at, train

# the recipes it runs, from nmcompile.recipes (a saved run is reused only while its recipe's options are the same;
# runs saved as "int8, row sr8 + row absmax8", before the fold, ran those backward GEMMs dense)
RECIPES = dict(options_of(["dense", "mvue 2:4", "luq4", "luq4 smp2", "luq4 + sawb4", "luq4 + absmax8", "sr4",
                           "int8, row sr8", "int8, tensor sr8", "sr8", "absmax8", "int8, row + row, folded",
                           "int8, row + row, folded, pow2", "int8, row + row, folded, saved8", "luq4, row",
                           "luq4, hadamard16", "sr8, row", "absmax8, row", "luq4, row, hadamard16",
                           "luq4 + absmax8, row"]))
# where the forward half's gap comes from: absmax8 per row on every forward GEMM but those named (docs/results.md §13)
_FORWARD = RECIPES["absmax8, row"]
RECIPES.update({"absmax8, row, attention's activation GEMMs dense": {**_FORWARD, "exclude": r"\.attn$"},
                "absmax8, row, attn.proj dense": {**_FORWARD, "exclude": r"\.attn\.proj$"},
                "absmax8, row, fwd_act_gemms off": {**_FORWARD, "fwd_act_gemms": False},
                "int8, row + row, folded, fwd_act_gemms off": {**RECIPES["int8, row + row, folded"],
                                                               "fwd_act_gemms": False}})
FNT_OF = "luq4 + sawb4"
# runs under PrecisionSwitch: name -> (the recipe it starts with, what it switches to)
SWITCHES = {"luq4 + sawb4, switch": ("luq4 + sawb4", "fnt"),  # to the FNT recipe: backward in high precision
            "luq4, switch": ("luq4", "dense")}
SWITCHED = "luq4 + sawb4, switch"
QUICK = ["dense", FNT_OF, SWITCHED]
SETTINGS = ("d", "layers", "heads", "block", "batch", "lr", "warmup", "tokens_per_param", "fnt_fraction",
            "noise_every", "eval_every", "inner")  # a saved run is reused only when these match


def log(msg: str) -> None:
    print(msg, flush=True)


def steps_for(args, params: int) -> int:
    return math.ceil(args.tokens_per_param * params / (args.batch * args.block))


def recipe_options(name: str, args) -> dict:
    return {**RECIPES[SWITCHES[name][0] if name in SWITCHES else name], "inner": args.inner}


def switch_target(name: str, options: dict) -> dict:
    return fnt_options(options) if SWITCHES[name][1] == "fnt" else {"inner": options["inner"]}


def run_one(name: str, seed: int, data: dict, args) -> dict:
    """One training run; the FNT recipe also runs its two extra phases, the switched one its switch."""
    model = byte_gpt(seed, args)
    params = sum(p.numel() for p in model.parameters())
    args.steps = steps_for(args, params)
    opt = adamw(model, lr_at(0, args))
    options = recipe_options(name, args)
    switch = monitor = None
    if name in SWITCHES:
        switch = nmcompile.PrecisionSwitch(model, options, then=switch_target(name, options), every=args.noise_every,
                                           threshold=args.switch_threshold, seed=seed, log=log)
        compiled = switch
    else:
        compiled = torch.compile(model, backend="nm", options=options)
        if NMConfig.from_options(options)[0].compresses_gradients:  # no monitor beside a switch
            monitor = nmcompile.NoiseMonitor(model, options, every=args.noise_every, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    record, _ = train(model, compiled, opt, data, args, gen, monitor=monitor, switch=switch)
    out = {"params": params, "steps": args.steps, "options": options, **record}
    if switch is not None:
        out["switch"] = {"window": switch.window, "patience": switch.patience, "threshold": switch.threshold,
                         "events": [{"step": e.step, "ratio": e.ratio, "to": e.to_options} for e in switch.events],
                         "measurements": [vars(m) for m in switch.measurements]}
    if NMConfig.from_options(options)[0].compresses_gradients:
        x, y = random_batch(data["train"], torch.Generator().manual_seed(10_000 + seed), args.batch, args.block)
        e2e = nmcompile.end_to_end_noise(model, x, y, options=options, draws=args.e2e_draws, seed=seed)
        out["end_to_end"] = [{k: v for k, v in p.as_dict().items() if k != "shape"} for p in e2e.params]
    if name == FNT_OF and not out["diverged"]:
        out["extra"] = extra_phases(model, opt, options, gen, data, args)
    return out


def extra_phases(model, opt, options: dict, gen: torch.Generator, data: dict, args) -> dict:
    """From the end of the schedule, ``fnt_fraction``·steps more, twice from the same state and batches: as FNT
    (high-precision backward) and in the recipe itself, both with the LR of the LUQ paper's Eq. 17."""
    total = max(1, round(args.fnt_fraction * args.steps))
    end = Snapshot.take(model, opt, gen, lr_at(args.steps - 1, args))
    out = {"steps": total}
    for phase, phase_options in (("fnt", fnt_options(options)), ("same", options)):
        out[phase] = bits_per_byte(branch(model, end, phase_options, total, data, args), data["val"])
    return out


# ----------------------------------------------------------------------------- reporting
def fmt(values: list, digits: int = 3) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def measurements(run: dict) -> list:
    """(step, Σ over the update GEMMs of ‖G‖² − minibatch var, of E‖Ĝ−G‖²) of each of one run's measurements."""
    if "switch" in run:
        return [(m["step"], m["gradient"], m["noise"]) for m in run["switch"]["measurements"]]
    out = []
    for point in run["noise"]:
        s = point["summary"].get(Role.WGRAD)
        if s and s["minibatch_noise"] is not None:
            out.append((point["step"], s["signal"] - s["minibatch_noise"], s["compression_noise"]))
    return out


def stall_ratios(run: dict, window: int = 1) -> list:
    """(step, ‖∇L‖²/(3·E‖Ĝ−G‖²) of the update GEMMs) at each measurement, both summed over the last ``window``
    measurements (1: each on its own; PrecisionSwitch's default: 4)."""
    points, out = measurements(run), []
    for i, (step, _, _) in enumerate(points):
        ratio = windowed_stall_ratio([(g, n) for _, g, n in points[: i + 1]], window)
        if ratio is not None:
            out.append((step, ratio))
    return out


def print_tables(results: dict) -> None:
    runs = results["runs"]
    dense = {seed: r["final_bpb"] for seed, r in runs.get("dense", {}).items()}
    log("\n| recipe | seeds | val bits/byte, final | Δ vs dense (same seed) | stall ratio, last quarter (share < 1) | "
        "switched at step |")
    log("|---|---|---|---|---|---|")
    for name, seeds in runs.items():
        final = [r["final_bpb"] for r in seeds.values()]
        delta = [r["final_bpb"] - dense[s] for s, r in seeds.items() if s in dense]
        late = [ratio for r in seeds.values() for step, ratio in stall_ratios(r) if step >= 0.75 * r["steps"]]
        stall = f"{statistics.median(late):.3g} ({sum(x < 1 for x in late) / len(late):.0%})" if late else "–"
        switched = ", ".join(str(r["switch"]["events"][0]["step"]) if r.get("switch", {}).get("events") else "never"
                             for r in seeds.values()) if name in SWITCHES else "–"
        log(f"| {name} | {len(seeds)} | {fmt(final)} | {fmt(delta) if name != 'dense' else '–'} | {stall} | "
            f"{switched} |")
    extra = [r["extra"] for r in runs.get(FNT_OF, {}).values() if "extra" in r]
    if extra:
        log(f"\n| {FNT_OF}, {extra[0]['steps']} more steps | val bits/byte |")
        log("|---|---|")
        log(f"| FNT (backward in high precision) | {fmt([e['fnt'] for e in extra])} |")
        log(f"| the same recipe | {fmt([e['same'] for e in extra])} |")


def _mean_curve(curves: list) -> tuple:
    """The mean over seeds of curves [(step, value)], at the steps all of them have."""
    steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves))) if curves else []
    values = [statistics.fmean(dict(c)[s] for c in curves) for s in steps]
    return steps, values


def plot(results: dict, out: pathlib.Path) -> None:
    plt = plots.pyplot()

    runs = results["runs"]
    colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(runs)}
    dense = _mean_curve([r["curve"] for r in runs.get("dense", {}).values()])
    fig, (ax, dx, nx) = plt.subplots(1, 3, figsize=(18, 5))
    for name, seeds in runs.items():
        steps, bpb = _mean_curve([r["curve"] for r in seeds.values()])
        ax.plot(steps, bpb, color=colours[name], label=name)
        if dense[0] and name != "dense":
            base = dict(zip(*dense))
            dx.plot([s for s in steps if s in base], [b - base[s] for s, b in zip(steps, bpb) if s in base],
                    color=colours[name], label=name)
        for run in seeds.values():
            for event in run.get("switch", {}).get("events", []):
                for a in (ax, dx):
                    a.axvline(event["step"], color=colours[name], linestyle=":", alpha=0.7)
        ratios = [stall_ratios(r, window=4) for r in seeds.values() if measurements(r)]
        if ratios:
            steps, values = _mean_curve(ratios)
            nx.plot(steps, [max(v, 1e-2) for v in values], color=colours[name], label=name)
    low = min(v for _, v in runs["dense"]["0"]["curve"]) if "dense" in runs and "0" in runs["dense"] else 2.5
    ax.set(xlabel="step", ylabel="validation bits/byte", title="validation bits per byte (mean of the seeds)",
           ylim=(low - 0.1, low + 1.2))
    dx.axhline(0.0, color="black", linewidth=0.8)
    dx.set(xlabel="step", ylabel="Δ bits/byte vs dense", title="gap to dense over training (dotted: the switches)")
    nx.axhline(1.0, color="black", linewidth=0.8)
    nx.set(xlabel="step", ylabel="‖∇L‖² / (3·E‖Ĝ−G‖²), update GEMMs", yscale="log",
           title="stall ratio over the last 4 measurements (below 1: noise dominates)")
    for a in (ax, dx, nx):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    plots.save(fig, out / "long_run.png", 100)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"1 seed, {', '.join(QUICK)}, a few steps (smoke test)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--recipes", nargs="+", metavar="NAME", help="a subset (default: all, then the switch)")
    parser.add_argument("--tokens-per-param", type=float, default=20.0, help="training bytes per parameter")
    add_training_arguments(parser, d=64, warmup=0.05, every=100)
    parser.add_argument("--e2e-draws", type=int, default=8, help="draws of the end-to-end noise at the end")
    parser.add_argument("--switch-threshold", type=float, default=1.0)
    parser.add_argument("--inner", choices=("inductor", "aot_eager"), default="inductor",
                        help="aot_eager: the same rewritten graphs without code generation (--quick)")
    parser.add_argument("--budget-minutes", type=float, default=120.0,
                        help="start no run that would end later, by the longest run so far (the first always runs)")
    parser.add_argument("--out", default="docs", help="where results_long.json and long_run.png go")
    parser.add_argument("--tables-from", metavar="JSON", help="print tables and redraw the plot from saved results")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tables_from:
        results = json.loads(pathlib.Path(args.tables_from).read_text())
        print_tables(results)
        plot(results, out)
        return 0
    names = args.recipes or [*RECIPES, *SWITCHES]
    if args.quick:
        args.seeds, args.tokens_per_param, args.eval_every, args.noise_every, args.eval_batches = [0], 0.5, 4, 4, 2
        args.e2e_draws, args.switch_threshold, args.inner = 2, 1e9, "aot_eager"  # the switch fires at once
        names = args.recipes or QUICK
    bad = [n for n in names if n not in RECIPES and n not in SWITCHES]
    if bad:
        parser.error(f"unknown recipe(s) {bad}; choose from {[*RECIPES, *SWITCHES]}")
    path = out / "results_long.json"
    settings = {k: getattr(args, k) for k in SETTINGS}
    results = json.loads(path.read_text()) if path.exists() else None
    if results is not None and results["settings"] != settings:
        parser.error(f"{path} holds runs made with other settings ({results['settings']}); use another --out")
    if results is None:
        results = {"settings": settings, "runs": {}, "sessions": []}
    data, corpus = lm_data(args.batch, args.block, args.eval_batches)
    results["corpus"] = corpus
    session = {"environment": {**environment(), "nmcompile": nmcompile.__version__},
               "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
               "runs": [], "wall_s": 0.0}  # kept in the results once it has finished a run
    start, longest = time.perf_counter(), 0.0
    changed = [n for n in names for run in results["runs"].get(n, {}).values()
               if "options" in run and run["options"] != recipe_options(n, args)]  # older runs did not record them
    if changed:
        parser.error(f"{path} holds runs of {sorted(set(changed))} under other options than nmcompile.recipes gives "
                     "them now; use another --out")
    todo = [(n, s) for n in names for s in args.seeds if str(s) not in results["runs"].get(n, {})]
    log(f"{len(todo)} run(s) to do, {sum(len(v) for v in results['runs'].values())} already in {path}")
    with sdpa_kernel(SDPBackend.MATH):
        for name, seed in todo:
            elapsed = time.perf_counter() - start
            if longest and elapsed + longest > 60 * args.budget_minutes:  # the first run gives the estimate
                log(f"budget: {elapsed / 60:.0f} of {args.budget_minutes:.0f} min used and a run takes up to "
                    f"{longest / 60:.0f}; {len(todo) - len(session['runs'])} run(s) left: rerun to go on")
                break
            began = time.perf_counter()
            run = run_one(name, seed, data, args)
            longest = max(longest, time.perf_counter() - began)
            results["runs"].setdefault(name, {})[str(seed)] = run
            if not session["runs"]:
                results["sessions"].append(session)
            session["runs"].append([name, seed])
            session["wall_s"] = time.perf_counter() - start
            path.write_text(json.dumps(results, separators=(",", ":")))  # each finished run is kept at once
            extra = "".join(f", {k} {v:.3f}" for k, v in run.get("extra", {}).items() if k != "steps")
            events = run.get("switch", {}).get("events")
            switched = f", switched at step {events[0]['step']}" if events else ""
            log(f"  {name:24s} seed {seed}: {run['steps']} steps ({run['params']} parameters), val "
                f"{run['final_bpb']:.3f} bits/byte{extra}{switched}{' DIVERGED' if run['diverged'] else ''} "
                f"({time.perf_counter() - began:.0f} s)")
    print_tables(results)
    plot(results, out)
    log(f"\nthis session {session['wall_s']:.0f} s; wrote {path} and {out / 'long_run.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

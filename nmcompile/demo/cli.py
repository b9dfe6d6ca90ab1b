"""The ``nmcompile demo`` command: its arguments, the run over every recipe and seed, the results table,
results.json and curves.png."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os

import torch

from nmcompile.data import load_digits_split
from nmcompile.demo.environment import environment
from nmcompile.demo.model import DigitsMLP
from nmcompile.demo.plots import plot_curves
from nmcompile.demo.recipes import DEFAULT, METHODS, QUICK
from nmcompile.demo.training import cosine_lr, gradient_noise, steps_per_epoch, train


def _values(run: dict, key: str) -> list:
    return [r[key] for r in run["seeds"]]


def _pm(values: list, scale: float = 1.0, digits: int = 2) -> str:
    """``mean ± std`` over seeds (just the value for one seed)."""
    t = torch.tensor([scale * float(v) for v in values], dtype=torch.float64)
    if len(values) == 1:
        return f"{t.item():.{digits}f}"
    return f"{t.mean().item():.{digits}f} ± {t.std().item():.{digits}f}"


def results_table(runs: dict, title: str):
    from rich.table import Table

    table = Table(title=title)
    for col in ("method", "test acc", "after epoch 2", "final loss", "grad var", "grad bias²", "wall s",
                "sparse bwd", "4-bit bwd"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    seeds = len(next(iter(runs.values()))["seeds"]) if runs else 0
    table.caption = (
        (f"test acc, after epoch 2, final loss: mean ± std over {seeds} seeds. " if seeds > 1 else "")
        + "grad var / grad bias²: the error of the compressed backward GEMMs' outputs, relative to their exact "
        "‖G‖², on one training batch after epoch 1 of the first seed (nmcompile.NoiseMonitor): MVUE, LUQ and SR are "
        "all variance, greedy all bias. wall s: training incl. compile, all seeds. sparse / 4-bit bwd: share of "
        "backward-GEMM FLOPs whose gradient operand is N:M-sparse / quantized (LUQ, SR)"
    )
    for name, r in runs.items():
        diverged = sum(_values(r, "diverged"))
        early = [c["curves"]["epoch_test_acc"][1] for c in r["seeds"] if len(c["curves"]["epoch_test_acc"]) > 1]
        noise = r.get("noise") or {}
        signal = noise.get("signal") or 0.0
        table.add_row(
            name,
            _pm(_values(r, "test_acc"), 100) + "%" + (f" ({diverged} diverged)" if diverged else ""),
            _pm(early, 100) + "%" if len(early) == len(r["seeds"]) else "–",
            _pm(_values(r, "final_loss"), digits=4),
            f"{noise['compression_variance'] / signal:.3f}" if signal else "–",
            f"{max(noise['compression_bias'], 0.0) / signal:.3f}" if signal else "–",
            f"{sum(_values(r, 'wall_s')):.1f}",
            f"{100 * r['seeds'][0]['sparse_flop_share']:.0f}%",
            f"{100 * r['seeds'][0]['quant_flop_share']:.0f}%",
        )
    return table


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"fast sanity run: hidden {QUICK['hidden']}, {QUICK['epochs']} epochs, one seed, inner=aot_eager "
        "(under a minute)",
    )
    parser.add_argument(
        "--out", default="nm-demo", help="directory for curves.png and results.json (default: ./nm-demo)"
    )
    parser.add_argument("--epochs", type=int, default=None, help="override the number of epochs")
    parser.add_argument("--hidden", type=int, default=None, help="override the hidden width (a multiple of 4)")
    parser.add_argument(
        "--inner", choices=("inductor", "aot_eager"), default=None, help="override the backend's inner compiler"
    )
    parser.add_argument(
        "--lowering", choices=("auto", "emulate", "native"), default="auto",
        help="the backend's lowering (default auto: exact int8 GEMMs where the CPU has VNNI or AMX)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=None, metavar="S",
                        help="torch seeds, each reset before its runs (default 0 1 2; --quick: 0)")
    parser.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate (cosine decay; default 0.1)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size, a multiple of 4 (default 64)")
    parser.add_argument(
        "--methods", default=None, help="comma-separated subset of: " + ", ".join(name for name, _ in METHODS)
    )
    return parser


def _validate(args: argparse.Namespace) -> None:
    if args.hidden % 4 or args.hidden <= 0:
        raise SystemExit(f"--hidden={args.hidden} must be a positive multiple of 4 so 2:4 groups fit")
    if args.batch_size % 4 or args.batch_size <= 0:
        raise SystemExit(
            f"--batch-size={args.batch_size} must be a positive multiple of 4 (wgrad groups run along the batch)"
        )
    if args.epochs < 1:
        raise SystemExit(f"--epochs={args.epochs} must be >= 1")
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"--seeds {' '.join(map(str, args.seeds))} repeats a seed")


def run_demo(args: argparse.Namespace) -> dict:
    """Run every method for every seed; returns the results dict that is also written to results.json."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    preset = QUICK if args.quick else DEFAULT
    args.epochs = args.epochs if args.epochs is not None else preset["epochs"]
    args.hidden = args.hidden if args.hidden is not None else preset["hidden"]
    args.inner = args.inner or preset["inner"]
    args.seeds = args.seeds if args.seeds is not None else list(preset["seeds"])
    _validate(args)
    methods = METHODS
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        known = dict(METHODS)
        bad = [m for m in wanted if m not in known]
        if bad:
            raise SystemExit(f"unknown method {bad[0]!r}; choose from: {', '.join(known)}")
        methods = [(m, known[m]) for m in wanted]

    err = Console(stderr=True)
    # Optional needs are checked before any training, and a missing plotter never loses results.
    if importlib.util.find_spec("sklearn") is None:
        raise SystemExit("nmcompile demo needs scikit-learn for its bundled digits data: pip install 'nmcompile[demo]'")
    can_plot = importlib.util.find_spec("matplotlib") is not None
    if not can_plot:
        err.print(
            "[yellow]matplotlib is not installed: results.json and the table only, no curves.png "
            "(pip install 'nmcompile\\[demo]')[/yellow]"
        )  # \\[: a literal bracket for rich
    os.makedirs(args.out, exist_ok=True)
    data = load_digits_split()
    spe = steps_per_epoch(data, args.batch_size)
    total = args.epochs * spe
    out = Console()
    if not out.is_terminal:  # piped or captured: the table's full width, not 80 columns of wrapped cells
        out = Console(width=max(out.width, 170))
    seeds = " ".join(map(str, args.seeds))
    err.print(
        f"[bold]nmcompile demo[/bold]: digits MLP 64-{args.hidden}x3-10, {args.epochs} epochs x {spe} steps, "
        f"batch {args.batch_size}, seeds {seeds}, inner={args.inner}, lowering={args.lowering}, "
        f"torch {torch.__version__}"
    )
    runs: dict = {}
    for name, opts in methods:
        options = {**opts, "inner": args.inner, "lowering": args.lowering}
        runs[name] = {"options": options, "seeds": [], "noise": None}
        for seed in args.seeds:
            torch.manual_seed(seed)  # same initial weights for every method
            model = DigitsMLP(args.hidden)
            with Progress(
                TextColumn("{task.description:<30}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TimeElapsedColumn(),
                console=err,
            ) as bar:
                task = bar.add_task(f"{name} (seed {seed})", total=total, loss="  -   ")

                def on_step(step: int, loss: float, seed=seed, model=model, name=name, opts=opts) -> None:
                    bar.update(task, advance=1, **({"loss": f"{loss:.4f}"} if step % 5 == 0 else {}))
                    # after epoch 1: the regime where the recipes part (later the model fits the
                    # training set and its gradients, nearly all zero, lose little to any pruning)
                    if seed == args.seeds[0] and step == spe:
                        runs[name]["noise"] = gradient_noise(model, opts, data, args.batch_size)

                run = train(model, options, data, epochs=args.epochs, lr_fn=cosine_lr(args.lr, total), seed=seed,
                            batch_size=args.batch_size, on_step=on_step)
            runs[name]["seeds"].append({"seed": seed, **run})
    title = (
        f"nmcompile demo: digits, MLP 64-{args.hidden}x3-10, {args.epochs} epochs, seeds {seeds}, inner={args.inner}"
    )
    out.print(results_table(runs, title))
    results = {
        "schema": "nmcompile.demo/3",  # 3: quant_flop_share per run
        "config": {
            "quick": bool(args.quick),
            "epochs": args.epochs,
            "hidden": args.hidden,
            "inner": args.inner,
            "lowering": args.lowering,
            "seeds": args.seeds,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "steps_per_epoch": spe,
            "train_size": len(data.x_train),
            "test_size": len(data.x_test),
        },
        "environment": environment(),
        "runs": runs,
    }
    path = os.path.join(args.out, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    written = [path]
    if can_plot:
        png = os.path.join(args.out, "curves.png")
        plot_curves(runs, png, title)
        written.insert(0, png)
    out.print(f"wrote {' and '.join(written)}")
    return results


def main(args: argparse.Namespace) -> int:
    """Entry point for ``nmcompile demo``; returns the process exit status."""
    import warnings

    with warnings.catch_warnings():  # one per run, about the caches we switch off to record the rewrites
        warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")
        run_demo(args)
    return 0

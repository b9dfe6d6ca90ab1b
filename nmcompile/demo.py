"""``nmcompile demo``: train one small model on bundled data under every gradient recipe and compare.

The same MLP, the same seeds and the same batches are trained with: dense, MVUE 2:4 and 1:2 on the
update (wgrad) GEMMs, greedy 2:4 (the biased baseline), MVUE and greedy 2:4 on both backward GEMMs
(wgrad+dgrad: where greedy's bias compounds through the layers), LUQ 4-bit gradients with SMP 2 and
SAWB 4-bit forward, and MVUE 2:4 followed by LUQ 4-bit; each for several seeds. After the first seed's
run, the gradient-noise monitor measures each recipe's gradient error on one batch: its variance and its
bias. Data: scikit-learn's bundled 8x8 digits (no download). Output: a rich progress bar per run
(stderr), a rich table (stdout, mean ± std over seeds), ``curves.png`` and ``results.json`` in ``--out``.

``--quick`` trains a narrower MLP (hidden 64) for 2 epochs, one seed, and compiles with
``inner="aot_eager"`` (the same rewritten graphs run eagerly, no C++ code generation); the default
trains hidden 128 for 10 epochs, seeds 0 1 2, through Inductor.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from nmcompile.data import Split, batches, load_digits_split

# (name, backend options): every run differs from "dense" only by these
METHODS: list[tuple[str, dict]] = [
    ("dense", {}),
    ("mvue 2:4", {"sparsity": "2:4"}),
    ("mvue 1:2", {"sparsity": "1:2"}),
    ("greedy 2:4", {"sparsity": "2:4", "method": "greedy"}),
    ("mvue 2:4 wgrad+dgrad", {"sparsity": "2:4", "gemms": ["wgrad", "dgrad"]}),
    ("greedy 2:4 wgrad+dgrad", {"sparsity": "2:4", "method": "greedy", "gemms": ["wgrad", "dgrad"]}),
    ("luq4 smp2 + sawb4", {"quant": "luq", "smp": 2, "fwd_quant": "sawb"}),
    ("mvue 2:4 + luq4", {"sparsity": "2:4", "quant": "luq"}),
]

QUICK = {"epochs": 2, "hidden": 64, "inner": "aot_eager", "seeds": [0]}
DEFAULT = {"epochs": 10, "hidden": 128, "inner": "inductor", "seeds": [0, 1, 2]}


class DigitsMLP(torch.nn.Module):
    """64 -> hidden -> hidden -> hidden -> 10 with ReLU; ``forward(x, y)`` returns the mean
    cross-entropy so the loss is part of the compiled graph. Hidden sizes are multiples of 4."""

    def __init__(self, hidden: int = 256, depth: int = 3, classes: int = 10, inputs: int = 64):
        super().__init__()
        dims = [inputs] + [hidden] * depth
        layers: list[torch.nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        layers.append(torch.nn.Linear(dims[-1], classes))
        self.net = torch.nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net(x), y)

    @torch.no_grad()
    def logits(self, x: torch.Tensor, fwd_bits: Optional[int] = None, keep_first_last: bool = True) -> torch.Tensor:
        """Eager inference; with ``fwd_bits`` the Linear layers' weights and inputs go through the
        same SAWB quantizer the backend uses in training (first and last layer kept in high
        precision when ``keep_first_last``), so a 4-bit-forward model is evaluated as it trained."""
        from nmcompile.functional import sawb

        linears = [m for m in self.net if isinstance(m, torch.nn.Linear)]
        quantized = set(linears[1:-1] if keep_first_last else linears) if fwd_bits else set()
        for module in self.net:
            if module in quantized:
                x = F.linear(sawb(x, fwd_bits), sawb(module.weight, fwd_bits), module.bias)
            else:
                x = module(x)
        return x


def evaluate(model: DigitsMLP, x: torch.Tensor, y: torch.Tensor, options: dict, batch_size: int = 64) -> float:
    """Test accuracy. A run with forward quantization is evaluated with it, in batches of the
    training batch size: SAWB scales are per tensor (per batch of activations), so this is the
    setting the model was trained in."""
    bits = options.get("fwd_bits", 4) if options.get("fwd_quant") else None
    correct = 0
    for start in range(0, len(x), batch_size):
        out = model.logits(x[start:start + batch_size], bits, options.get("keep_first_last", True))
        correct += (out.argmax(-1) == y[start:start + batch_size]).sum().item()
    return correct / len(x)


def cosine_lr(lr: float, total: int, final_fraction: float = 0.05) -> Callable[[int], float]:
    """Cosine decay from ``lr`` to ``final_fraction * lr`` over ``total`` steps."""
    return lambda step: (
        lr * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    )


def steps_per_epoch(data: Split, batch_size: int) -> int:
    return len(data.x_train) // batch_size


def flop_shares(records: list, options: dict) -> dict:
    from nmcompile.passes import NMConfig
    from nmcompile.report import Report

    summary = Report(list(records), NMConfig.from_options(options)[0].as_dict()).summary()
    return {"sparse_flop_share": summary["sparse_flop_share"], "luq_flop_share": summary["luq_flop_share"]}


def train(
    model: DigitsMLP,
    options: dict,
    data: Split,
    *,
    epochs: int,
    lr_fn: Callable[[int], float],
    seed: int,
    batch_size: int = 64,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    optimizer: Optional[torch.optim.Optimizer] = None,
    on_step: Optional[Callable[[int, float], None]] = None,
    eval_options: Optional[dict] = None,
    record: bool = True,
) -> dict:
    """Train ``model`` (in place) compiled with ``backend="nm", options=options``; ``lr_fn(step)``
    sets the LR of every step. Batches come from a generator seeded with ``seed`` and the global
    torch seed is set to ``seed`` (the nm ops draw their randomness from it). Returns the curves,
    the final metrics, the wall time and the FLOP shares recorded while compiling."""
    from nmcompile.backend import recording

    torch._dynamo.reset()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if optimizer is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr_fn(0), momentum=momentum, weight_decay=weight_decay)
    compiled = torch.compile(model, backend="nm", options=dict(options))
    eval_options = options if eval_options is None else eval_options
    n_steps = epochs * steps_per_epoch(data, batch_size)
    step, losses, epoch_loss, test_acc, records = 0, [], [], [], []
    diverged = False
    start = time.perf_counter()
    compile_s = 0.0
    for _ in range(epochs):
        total = 0.0
        count = 0
        for idx in batches(len(data.x_train), batch_size, gen):
            for group in optimizer.param_groups:
                group["lr"] = lr_fn(step)
            t0 = time.perf_counter()
            if step == 0:  # compile inside recording(); caches off so the pass runs and records
                with recording() as records, torch._inductor.config.patch(force_disable_caches=record):
                    loss = compiled(data.x_train[idx], data.y_train[idx])
                    loss.backward()
                compile_s = time.perf_counter() - t0
            else:
                loss = compiled(data.x_train[idx], data.y_train[idx])
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = loss.item()
            if not math.isfinite(value):
                diverged = True
            losses.append(value)
            total += value
            count += 1
            step += 1
            if on_step is not None:
                on_step(step, value)
        epoch_loss.append(total / max(count, 1))
        test_acc.append(evaluate(model, data.x_test, data.y_test, eval_options, batch_size))
    wall = time.perf_counter() - start
    return {
        "options": dict(options),
        "steps": n_steps,
        "final_loss": epoch_loss[-1] if epoch_loss else float("nan"),
        "test_acc": test_acc[-1] if test_acc else float("nan"),
        "test_acc_fp": evaluate(model, data.x_test, data.y_test, {}, batch_size),  # high-precision forward
        "diverged": diverged,
        "wall_s": wall,
        "compile_s": compile_s,
        "curves": {"step_loss": losses, "epoch_loss": epoch_loss, "epoch_test_acc": test_acc},
        # without record=True an Inductor cache hit skips the pass and records nothing: no shares then
        **(flop_shares(records, options) if record else {"sparse_flop_share": None, "luq_flop_share": None}),
    }


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _values(run: dict, key: str) -> list:
    return [r[key] for r in run["seeds"]]


def _pm(values: list, scale: float = 1.0, digits: int = 2) -> str:
    """``mean ± std`` over seeds (just the value for one seed)."""
    t = torch.tensor([scale * float(v) for v in values], dtype=torch.float64)
    if len(values) == 1:
        return f"{t.item():.{digits}f}"
    return f"{t.mean().item():.{digits}f} ± {t.std().item():.{digits}f}"


def plot_curves(runs: dict, path: str, title: str) -> None:
    """Training loss and test accuracy per epoch of every method (mean over seeds, ± std shaded) in one PNG."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, run in runs.items():
        for ax, key, scale in ((ax_loss, "epoch_loss", 1.0), (ax_acc, "epoch_test_acc", 100.0)):
            curves = torch.tensor([[scale * v for v in r["curves"][key]] for r in run["seeds"]], dtype=torch.float64)
            epochs = list(range(1, curves.shape[1] + 1))
            mean = curves.mean(0)
            (line,) = ax.plot(epochs, mean, marker=".", label=name, ls="--" if "wgrad+dgrad" in name else "-")
            if curves.shape[0] > 1:
                std = curves.std(0)
                ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.12)
    ax_loss.set(xlabel="epoch", ylabel="mean training loss", yscale="log", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    ax_acc.legend(fontsize=8)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
        "‖G‖², on one training batch after epoch 1 of the first seed (nmcompile.NoiseMonitor): MVUE and LUQ are "
        "all variance, greedy all bias. wall s: training incl. compile, all seeds. sparse / 4-bit bwd: share of "
        "backward-GEMM FLOPs whose gradient operand is N:M-sparse / LUQ 4-bit"
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
            f"{100 * r['seeds'][0]['luq_flop_share']:.0f}%",
        )
    return table


def gradient_noise(model: DigitsMLP, options: dict, data: Split, batch_size: int) -> Optional[dict]:
    """The noise monitor's totals over the compressed backward GEMMs on the first ``batch_size`` training
    examples (it leaves the run's gradients and RNG stream alone); None for a recipe that compresses no
    gradient."""
    from nmcompile.noise import NoiseMonitor
    from nmcompile.passes import NMConfig

    if not NMConfig.from_options(options)[0].compresses_gradients:
        return None
    report = NoiseMonitor(model, options, draws=4).measure(data.x_train[:batch_size], data.y_train[:batch_size])
    return report.summary()["total"]


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
        f"batch {args.batch_size}, seeds {seeds}, inner={args.inner}, torch {torch.__version__}"
    )
    runs: dict = {}
    for name, opts in methods:
        options = {**opts, "inner": args.inner}
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
        "schema": "nmcompile.demo/2",
        "config": {
            "quick": bool(args.quick),
            "epochs": args.epochs,
            "hidden": args.hidden,
            "inner": args.inner,
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


if __name__ == "__main__":  # python -m nmcompile.demo
    sys.exit(
        main(
            add_arguments(
                argparse.ArgumentParser(prog="nmcompile demo", description=__doc__.splitlines()[0])
            ).parse_args()
        )
    )

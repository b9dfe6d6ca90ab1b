"""Reproduce the papers' qualitative claims on CPU-sized data (digits, bundled with scikit-learn).

    python tools/reproduce.py                 # 3 seeds (0 1 2), the numbers in docs/results.md
    python tools/reproduce.py --quick         # 1 seed, 2 epochs: a sanity check in ~2 minutes

Experiments (every training run: MLP 64-64x3-10, SGD momentum 0.9, cosine LR, batch 64, the seed
resets torch's RNG, so runs of one seed differ only by the method):
 1. gradient sparsity on the update (wgrad) GEMMs: dense vs MVUE 1:2 / 2:4 vs greedy 1:2 / 2:4;
 2. 4-bit: LUQ4 and LUQ4+SMP2 (backward only), the full recipe LUQ4+SMP2 with SAWB4 forward, then
    FNT (LUQ §5.2): T more epochs, backward in high precision, forward still SAWB4, LR ramp/decay; as
    a control the same T epochs with the 4-bit recipe unchanged;
 3. the variance of N:M estimators on real neural gradients dL/dY captured from the dense model,
    grouped 2:4 (and 1:2) along tokens as in the wgrad GEMM: exact formulas and Monte-Carlo.
Prints progress; writes results.json, reproduce_accuracy.png and reproduce_variance.png to --out and
markdown tables to stdout.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

import nmcompile
from nmcompile.data import load_digits_split
from nmcompile.demo.environment import environment
from nmcompile.demo.model import DigitsMLP
from nmcompile.demo.training import cosine_lr, steps_per_epoch, train
from nmcompile.fnt import fnt_options, fnt_scheduler
from nmcompile.kernels.reference import mvue_variance
from nmcompile.recipes import options_of

SPARSITY = options_of(["dense", "mvue 1:2", "mvue 2:4", "greedy 1:2", "greedy 2:4", "greedy 2:4 wgrad+dgrad"])
QUANT = options_of(["luq4", "luq4 smp2", "luq4 smp2 + sawb4"])
RECIPE = "luq4 smp2 + sawb4"


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- estimators (exp. 3)

def hu_approx_probabilities(a: torch.Tensor) -> torch.Tensor:
    """Exact inclusion probabilities of successive sampling 2 of 4 (first ∝ a_i, second ∝ a_j among
    the rest): p_i = a_i/S + a_i Σ_{j≠i} (a_j/S)/(S - a_j). ``a`` [..., 4] positive (float64)."""
    s = a.sum(-1, keepdim=True)
    k = (a / s) / (s - a)  # k_j = (a_j/S)/(S - a_j)
    return a / s + a * (k.sum(-1, keepdim=True) - k)


def hu_approx_sample(x: torch.Tensor, generator: torch.Generator, eps: float = 1.19e-7) -> torch.Tensor:
    """Hu et al.'s MVUE24_approx on groups x [G, 4]: successive sampling, kept values x_i/p_i."""
    a = x.abs().double() + eps
    first = torch.multinomial(a, 1, generator=generator)
    rest = a.scatter(1, first, 0.0)
    second = torch.multinomial(rest, 1, generator=generator)
    keep = torch.zeros_like(a, dtype=torch.bool).scatter(1, first, True).scatter(1, second, True)
    p = hu_approx_probabilities(a)
    return torch.where(keep, x.double() / p, 0.0)


def uniform_sample(x: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Keep n of M uniformly at random, scale by M/n (unbiased, ignores magnitudes)."""
    g, m = x.shape
    r = torch.rand(g, m, generator=generator, dtype=torch.float64)
    idx = r.argsort(-1)[:, :n]
    keep = torch.zeros(g, m, dtype=torch.bool).scatter(1, idx, True)
    return torch.where(keep, x.double() * (m / n), 0.0)


def capture_gradients(model: DigitsMLP, x: torch.Tensor, y: torch.Tensor) -> dict:
    """dL/dY (the neural gradient at every hidden Linear's output) and the Linear's input, for one batch."""
    outs, ins, handles = {}, {}, []
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}

    def hook(name):
        def fn(module, inp, out):
            out.retain_grad()
            outs[name], ins[name] = out, inp[0].detach()
        return fn

    for name, m in linears.items():
        handles.append(m.register_forward_hook(hook(name)))
    model.zero_grad()
    model(x, y).backward()
    for h in handles:
        h.remove()
    model.zero_grad()
    return {name: (outs[name].grad.detach().double(), ins[name].double()) for name in list(linears)[:-1]}


def variance_study(delta: torch.Tensor, act: torch.Tensor, draws: int, seed: int) -> dict:
    """Per-estimator error of the neural gradient δ [tokens, features] grouped along tokens (as the
    wgrad GEMM dW = δᵀX uses it), relative to ‖δ‖², exact and Monte-Carlo, plus the Monte-Carlo
    relative error of dW itself."""
    gt = delta.t().contiguous()  # [features, tokens]: groups of M consecutive tokens
    norm2 = (gt ** 2).sum().item()
    dw = gt @ act
    dw2 = (dw ** 2).sum().item()
    gen = torch.Generator().manual_seed(seed)
    out = {}

    def groups(m):
        return gt.reshape(-1, m)

    # exact (closed form): unbiased -> variance; greedy -> squared bias (deterministic)
    g4, g2 = groups(4), groups(2)
    p_hu = hu_approx_probabilities(g4.abs() + 1.19e-7)
    exact = {
        "mvue 2:4": mvue_variance(g4, 2).sum().item(),
        "hu approx 2:4": (g4 ** 2 * (1 / p_hu - 1)).sum().item(),
        "uniform 2:4": (g4 ** 2).sum().item(),  # p = 1/2: x²(1/p - 1) = x²
        "mvue 1:2": mvue_variance(g2, 1).sum().item(),
        "uniform 1:2": (g2 ** 2).sum().item(),
    }
    exact["greedy 2:4"] = ((g4 - nmcompile.greedy(g4, "2:4").double()) ** 2).sum().item()
    exact["greedy 1:2"] = ((g2 - nmcompile.greedy(g2, "1:2").double()) ** 2).sum().item()
    from nmcompile.kernels.reference import luq_variance
    exact["luq4"] = luq_variance(gt, 4, "strict").sum().item()
    exact["luq4 smp2"] = luq_variance(gt, 4, "strict", samples=2).sum().item()

    samplers = {
        "mvue 2:4": lambda: nmcompile.mvue(gt.float(), "2:4").double(),
        "hu approx 2:4": lambda: hu_approx_sample(g4, gen).reshape(gt.shape),
        "uniform 2:4": lambda: uniform_sample(g4, 2, gen).reshape(gt.shape),
        "greedy 2:4": lambda: nmcompile.greedy(gt.float(), "2:4").double(),
        "mvue 1:2": lambda: nmcompile.mvue(gt.float(), "1:2").double(),
        "uniform 1:2": lambda: uniform_sample(g2, 1, gen).reshape(gt.shape),
        "greedy 1:2": lambda: nmcompile.greedy(gt.float(), "1:2").double(),
        "luq4": lambda: nmcompile.luq(gt.float(), 4).double(),
        "luq4 smp2": lambda: nmcompile.luq(gt.float(), 4, samples=2).double(),
    }
    torch.manual_seed(seed)
    for name, draw in samplers.items():
        total = torch.zeros_like(gt)
        err2 = 0.0
        dw_err2 = 0.0
        for _ in range(draws):
            s = draw()
            total += s
            err2 += ((s - gt) ** 2).sum().item()
            dw_err2 += ((s @ act - dw) ** 2).sum().item()
        mean = total / draws
        out[name] = {
            "exact_rel": exact[name] / norm2,  # variance (unbiased) or squared bias (greedy), / ‖δ‖²
            "mc_rel_mse": err2 / draws / norm2,  # E‖ŝ - δ‖² / ‖δ‖², Monte-Carlo
            "mc_rel_bias2": ((mean - gt) ** 2).sum().item() / norm2,  # ‖E ŝ - δ‖² / ‖δ‖² (includes MC noise/draws)
            "dw_rel_mse": dw_err2 / draws / dw2,  # E‖dŴ - dW‖² / ‖dW‖²
        }
    return out


# ----------------------------------------------------------------------------- training (exp. 1, 2)

def run(name, options, data, args, seed, model=None, label_seed=None, **kw):
    t0 = time.perf_counter()
    if model is None:
        torch.manual_seed(seed)
        model = DigitsMLP(args.hidden)
    total = args.epochs * steps_per_epoch(data, args.batch_size)
    kw.setdefault("lr_fn", cosine_lr(args.lr, total))
    kw.setdefault("epochs", args.epochs)
    r = train(model, {**options, "inner": "aot_eager"}, data, seed=seed, batch_size=args.batch_size,
              record=False, **kw)
    r["curves"].pop("step_loss")
    log(
        f"  seed {seed if label_seed is None else label_seed}  {name:<34} test acc {100 * r['test_acc']:6.2f}%  "
        f"final loss {r['final_loss']:.4f}"
        f"{'  DIVERGED' if r['diverged'] else ''}  ({time.perf_counter() - t0:.1f}s)"
    )
    return r, model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, 1 FNT epoch, 50 draws")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--fnt-epochs", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--draws", type=int, default=30, help="Monte-Carlo draws per estimator (exp. 3)")
    parser.add_argument("--out", default="docs", help="where results.json and the PNGs go (default docs/)")
    parser.add_argument(
        "--tables-from",
        metavar="JSON",
        help="only print the tables (and redraw the plots into --out) from an earlier run's results.json",
    )
    args = parser.parse_args(argv)
    if args.tables_from:
        with open(args.tables_from) as f:
            results = json.load(f)
        print_tables(results)
        plot(results, args.out)
        return 0
    if args.quick:
        args.seeds, args.epochs, args.fnt_epochs, args.draws = args.seeds[:1], 2, 1, 10
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    data = load_digits_split()
    spe = steps_per_epoch(data, args.batch_size)
    env = environment()
    log(
        f"reproduce: seeds {args.seeds}, {args.epochs} epochs x {spe} steps, FNT {args.fnt_epochs} epochs, "
        f"MLP 64-{args.hidden}x3-10, torch {env['torch']}, {env['cpu']}"
    )
    started = time.perf_counter()
    runs: dict = {}
    for seed in args.seeds:
        log(f"[seed {seed}] experiment 1: gradient sparsity (wgrad)")
        for name, opts in SPARSITY:
            runs.setdefault(name, []).append(run(name, opts, data, args, seed)[0])
        log(f"[seed {seed}] experiment 2: 4-bit (LUQ, SMP, SAWB, FNT)")
        for name, opts in QUANT:
            r, model = run(name, opts, data, args, seed)
            runs.setdefault(name, []).append(r)
        # `model` is the RECIPE model; lr_T = where the 4-bit phase's cosine ended
        total = args.epochs * spe
        lr_t = cosine_lr(args.lr, total)(total)
        T = args.fnt_epochs * spe
        for name, opts in (
            (f"{RECIPE} + FNT {args.fnt_epochs}ep", fnt_options(dict(QUANT)[RECIPE])),
            (f"{RECIPE} + {args.fnt_epochs}ep more 4-bit", dict(QUANT)[RECIPE]),
        ):
            m = copy.deepcopy(model)
            opt = torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
            sched = fnt_scheduler(opt, T, lr_start=lr_t, lr_base=args.lr)
            lrs = [sched.lr_lambdas[0](s) * args.lr for s in range(T + 1)]
            r, _ = run(
                name,
                opts,
                data,
                args,
                seed + 1000,
                model=m,
                label_seed=seed,
                epochs=args.fnt_epochs,
                optimizer=opt,
                lr_fn=lambda s, lrs=lrs: lrs[s],
                eval_options=dict(QUANT)[RECIPE],
            )
            runs.setdefault(name, []).append(r)
        log(f"  elapsed {time.perf_counter() - started:.0f}s")

    log("experiment 3: estimator variance on captured neural gradients")
    variance: dict = {}
    for seed in args.seeds:
        torch.manual_seed(seed)
        model = DigitsMLP(args.hidden)
        train(
            model,
            {"inner": "aot_eager"},
            data,
            epochs=1,
            lr_fn=cosine_lr(args.lr, args.epochs * spe),
            seed=seed,
            batch_size=args.batch_size,
            record=False,
        )
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(data.x_train), generator=gen)[: args.batch_size]
        for layer, (delta, act) in capture_gradients(model, data.x_train[idx], data.y_train[idx]).items():
            for est, v in variance_study(delta, act, args.draws, seed).items():
                variance.setdefault(est, []).append(v)
            log(f"  seed {seed} layer {layer}: done")
    # reference point: heavy-tailed synthetic groups (|x| log-normal, sigma 2), exact formulas only
    gen = torch.Generator().manual_seed(0)
    synth = torch.exp(2 * torch.randn(100000, 4, generator=gen, dtype=torch.float64)) * torch.sign(
        torch.randn(100000, 4, generator=gen, dtype=torch.float64)
    )
    hu = synth**2 * (1 / hu_approx_probabilities(synth.abs()) - 1)
    ratio = hu.sum(-1) / mvue_variance(synth, 2).sum(-1)
    variance_synthetic = {
        "groups": 100000,
        "median_group_ratio_hu_over_mvue": ratio.median().item(),
        "max_group_ratio": ratio.max().item(),
        "total_ratio_hu_over_mvue": (hu.sum() / mvue_variance(synth, 2).sum()).item(),
    }
    log(
        f"synthetic log-normal groups: hu approx / mvue variance, median per group "
        f"{variance_synthetic['median_group_ratio_hu_over_mvue']:.3f}, max {variance_synthetic['max_group_ratio']:.3f}"
    )
    log(f"total {time.perf_counter() - started:.0f}s")

    results = {
        "command": "python tools/reproduce.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": vars(args),
        "environment": env,
        "runs": runs,
        "variance": variance,
        "variance_synthetic": variance_synthetic,
        "wall_s": time.perf_counter() - started,
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print_tables(results)
    plot(results, args.out)
    return 0


def ms(values, scale=1.0, fmt="{:.2f}"):
    values = [scale * v for v in values]
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return (fmt + " ± " + fmt).format(mean, std)


def print_tables(results: dict) -> None:
    runs, var = results["runs"], results["variance"]
    print(
        "\n| method | test acc after epoch 1 (%) | after epoch 2 (%) | final test acc (%) | final, fp forward (%) "
        "| train loss epoch 2 | final train loss | diverged |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, rs in runs.items():
        acc = [r["curves"]["epoch_test_acc"] for r in rs]
        loss = [r["curves"]["epoch_loss"] for r in rs]
        early = (lambda k: ms([a[k] for a in acc], 100)) if len(acc[0]) > 1 else (lambda k: "-")
        early_loss = ms([l_[1] for l_ in loss], 1, "{:.4f}") if len(loss[0]) > 1 else "-"
        print(
            f"| {name} | {early(0)} | {early(1)} | {ms([r['test_acc'] for r in rs], 100)} | "
            f"{ms([r['test_acc_fp'] for r in rs], 100)} | {early_loss} | "
            f"{ms([r['final_loss'] for r in rs], 1, '{:.4f}')} | {sum(r['diverged'] for r in rs)}/{len(rs)} |"
        )
    print(
        "\n| estimator | exact: Var or bias² / ‖δ‖² | Monte-Carlo E‖ŝ−δ‖² / ‖δ‖² | MC ‖Eŝ−δ‖² / ‖δ‖² "
        "| MC E‖dŴ−dW‖² / ‖dW‖² |"
    )
    print("|---|---|---|---|---|")
    for name, vs in var.items():
        print(
            f"| {name} | {ms([v['exact_rel'] for v in vs], 1, '{:.4f}')} "
            f"| {ms([v['mc_rel_mse'] for v in vs], 1, '{:.4f}')} | "
            f"{ms([v['mc_rel_bias2'] for v in vs], 1, '{:.4f}')} | {ms([v['dw_rel_mse'] for v in vs], 1, '{:.4f}')} |"
        )
    if "mvue 2:4" in var and "hu approx 2:4" in var:
        ratios = [h["exact_rel"] / m["exact_rel"] for h, m in zip(var["hu approx 2:4"], var["mvue 2:4"])]
        print(
            f"\nhu approx / mvue 2:4 exact variance ratio: {ms(ratios, 1, '{:.3f}')} "
            f"(min {min(ratios):.3f}, max {max(ratios):.3f})"
        )


def plot(results: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for ax, names, title in (
        (axes[0], [n for n, _ in SPARSITY], "gradient N:M sparsity (wgrad)"),
        (axes[1], ["dense"] + [n for n, _ in QUANT], "4-bit (LUQ / SMP / SAWB)"),
    ):
        for name in names:
            curves = torch.tensor([r["curves"]["epoch_test_acc"] for r in runs[name]]) * 100
            mean, std = curves.mean(0), curves.std(0) if len(curves) > 1 else torch.zeros(curves.shape[1])
            ep = torch.arange(1, len(mean) + 1)
            ax.plot(ep, mean, marker=".", label=name)
            ax.fill_between(ep, mean - std, mean + std, alpha=0.15)
        ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=title)
        ax.set_ylim(bottom=max(0, ax.get_ylim()[0]))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"digits MLP, mean ± std over seeds {results['args']['seeds']}")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "reproduce_accuracy.png"), dpi=110)
    plt.close(fig)

    var = results["variance"]
    names = list(var)
    fig, ax = plt.subplots(figsize=(9, 4))
    vals = [statistics.fmean(v["exact_rel"] for v in var[n]) for n in names]
    colors = ["tab:red" if n.startswith("greedy") else "tab:blue" for n in names]
    ax.bar(range(len(names)), vals, color=colors)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set(
        ylabel="Var (unbiased) or bias² (greedy, red) / ‖δ‖²",
        yscale="log",
        title="error of the pruned / quantized neural gradient (groups along tokens)",
    )
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "reproduce_variance.png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

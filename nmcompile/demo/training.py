"""Training one recipe: the LR schedule, the loop (compiled with ``backend="nm"``), the FLOP shares recorded
while compiling, and the gradient noise measured on one batch."""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch

from nmcompile.data import Split, batches
from nmcompile.demo.model import DigitsMLP, evaluate


def cosine_lr(lr: float, total: int, final_fraction: float = 0.05) -> Callable[[int], float]:
    """Cosine decay from ``lr`` to ``final_fraction * lr`` over ``total`` steps."""
    return lambda step: (
        lr * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    )


def steps_per_epoch(data: Split, batch_size: int) -> int:
    return len(data.x_train) // batch_size


# the report's shares of backward-GEMM FLOPs kept per run: N:M-sparse, LUQ, any quantized gradient (LUQ, SR)
FLOP_SHARES = ("sparse_flop_share", "luq_flop_share", "quant_flop_share")


def flop_shares(records: list, options: dict) -> dict:
    from nmcompile.passes.config import NMConfig
    from nmcompile.report import Report

    summary = Report(list(records), NMConfig.from_options(options)[0].as_dict()).summary()
    return {key: summary[key] for key in FLOP_SHARES}


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
        **(flop_shares(records, options) if record else dict.fromkeys(FLOP_SHARES)),
    }


def gradient_noise(model: DigitsMLP, options: dict, data: Split, batch_size: int) -> Optional[dict]:
    """The noise monitor's totals over the compressed backward GEMMs on the first ``batch_size`` training
    examples (it leaves the run's gradients and RNG stream alone); None for a recipe that compresses no
    gradient."""
    from nmcompile.noise import NoiseMonitor

    monitor = NoiseMonitor(model, options, draws=4)  # parses and validates the options
    if not monitor.config.compresses_gradients:
        return None
    report = monitor.measure(data.x_train[:batch_size], data.y_train[:batch_size])
    return report.summary()["total"]

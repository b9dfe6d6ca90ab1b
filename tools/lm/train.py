"""The LM tools' training: the byte-level GPT, its LR schedule, its score, and one training loop whose hooks are the
noise monitor (measures without changing the run), the precision switch (may change the recipe before a step) and
a snapshot for an FNT branch (the rest of the schedule, or more steps, from a saved state under another recipe)."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import time
from typing import Optional

import torch

from nmcompile.examples import GPT
from nmcompile.fnt import fnt_scheduler

from .corpus import random_batch

NOISE_FIELDS = ("module", "role", "signal", "compression_noise", "compression_variance", "compression_bias",
                "minibatch_noise")


def add_training_arguments(parser: argparse.ArgumentParser, *, d: int, warmup: float, every: int) -> None:
    """The model, batch, schedule, evaluation, noise and FNT arguments of the LM tools; ``every``: the default of
    --eval-every and --noise-every."""
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block", type=int, default=128, help="context length in bytes")
    parser.add_argument("--d", type=int, default=d)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=float, default=warmup, help="warm-up fraction of the steps")
    parser.add_argument("--eval-every", type=int, default=every)
    parser.add_argument("--eval-batches", type=int, default=16, help="validation batches for the final score")
    parser.add_argument("--noise-every", type=int, default=every)
    parser.add_argument("--fnt-fraction", type=float, default=0.1)


def byte_gpt(seed: int, args) -> GPT:
    """A fresh byte-level GPT (vocabulary 256, attention through SDPA) initialised from ``seed``, with Dynamo's
    caches cleared so that its compile starts from nothing."""
    torch._dynamo.reset()
    torch.manual_seed(seed)
    return GPT(256, args.d, args.layers, args.heads, args.block, sdpa=True)


def adamw(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)


def lr_at(step: int, args) -> float:
    """Linear warm-up over ``args.warmup`` of the steps, then cosine down to a tenth of ``args.lr``."""
    warm = max(1, int(args.warmup * args.steps))
    if step < warm:
        return args.lr * (step + 1) / warm
    frac = (step - warm) / max(1, args.steps - warm)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def bits_per_byte(model_fn, val_batches) -> float:
    """Mean cross-entropy over the validation batches, in bits. ``model_fn`` runs with grad enabled so a
    compiled model runs its training graph (with its quantized forward); nothing is backpropagated."""
    total = 0.0
    for x, y in val_batches:
        with torch.enable_grad():
            total += float(model_fn(x, y).detach())
    return total / len(val_batches) / math.log(2)


def update(loss: torch.Tensor, opt) -> None:
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def compact(gemm: dict) -> dict:
    """A GEMM's measured numbers only (its ratios follow from them): keeps the results files small."""
    return {key: gemm[key] for key in NOISE_FIELDS}


def train_step(compiled, opt, x, y, step: int, args, monitor, out: dict) -> bool:
    """Step ``step`` of the schedule on batch (x, y), recorded in ``out``: the noise monitor's measurement at its
    steps (on this batch, before the update), the LR of ``lr_at``, forward, backward and the update, and the training
    loss every 10 steps. False, with ``out["diverged"]``, when the loss is not finite (nothing is updated)."""
    if monitor is not None and step % args.noise_every == 0:
        report = monitor.measure(x, y, step=step)
        out["noise"].append({"step": step, "summary": report.summary(),
                             "gemms": [compact(g.as_dict()) for g in report.gemms]})
    for group in opt.param_groups:
        group["lr"] = lr_at(step, args)
    loss = compiled(x, y)
    if not torch.isfinite(loss):
        out["diverged"] = True
        return False
    update(loss, opt)
    if step % 10 == 0:
        out["train_loss"].append([step, float(loss.detach())])
    return True


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A run's state before one step: enough to go on from there under another recipe. ``rng``: the global RNG
    state too (the nm ops draw their uniforms from it), for a branch that must see the same draws as the run."""

    model: dict
    opt: dict
    gen: torch.Tensor  # the batch generator's state
    lr: float  # the LR the schedule gives that step
    rng: Optional[torch.Tensor] = None

    @classmethod
    def take(cls, model, opt, gen: torch.Generator, lr: float, rng: bool = False) -> "Snapshot":
        return cls(copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), gen.get_state(), lr,
                   torch.random.get_rng_state() if rng else None)


def train(model, compiled, opt, data: dict, args, gen: torch.Generator, *, monitor=None, switch=None,
          snapshot_at: Optional[int] = None) -> tuple[dict, Optional[Snapshot]]:
    """``args.steps`` steps of the schedule on random training batches from ``gen``: the validation curve every
    ``args.eval_every`` steps and at the end, the final score, the training loss and the hooks' records.

    Hooks: ``monitor`` (a NoiseMonitor) measures every ``args.noise_every`` steps; ``switch`` (a PrecisionSwitch, also
    what ``compiled`` is) sees each batch before its step and may change the recipe; at ``snapshot_at`` the state
    before that step is kept (with the global RNG) and returned. Returns (record, snapshot or None)."""
    out = {"curve": [], "train_loss": [], "noise": [], "diverged": False}
    snapshot = None
    start = time.perf_counter()
    for step in range(args.steps):
        if step == snapshot_at:
            snapshot = Snapshot.take(model, opt, gen, lr_at(step, args), rng=True)
        if step % args.eval_every == 0:
            out["curve"].append([step, bits_per_byte(compiled, data["val_small"])])
        x, y = random_batch(data["train"], gen, args.batch, args.block)
        if switch is not None:
            switch.on_step(step, x, y)  # measures (its own noise record) and may switch before this step
        if not train_step(compiled, opt, x, y, step, args, monitor, out):
            break
    out["curve"].append([args.steps, bits_per_byte(compiled, data["val_small"])])
    out["final_bpb"] = bits_per_byte(compiled, data["val"])
    out["wall_s"] = time.perf_counter() - start
    return out, snapshot


def branch(model, snapshot: Snapshot, options: dict, steps: int, data: dict, args):
    """From ``snapshot``: ``steps`` steps compiled with ``options``, the LR along the LUQ paper's Eq. 17 from the
    snapshot's LR up to ``args.lr`` and down to 0, the batches (and, where kept, the RNG) going on from the snapshot.
    Returns the compiled model, to be scored."""
    torch._dynamo.reset()
    model.load_state_dict(snapshot.model)
    opt = adamw(model, snapshot.lr)
    opt.load_state_dict(snapshot.opt)
    sched = fnt_scheduler(opt, total=steps, lr_start=snapshot.lr, lr_base=args.lr)
    compiled = torch.compile(model, backend="nm", options=options)
    if snapshot.rng is not None:
        torch.random.set_rng_state(snapshot.rng)
    gen = torch.Generator()
    gen.set_state(snapshot.gen)
    for _ in range(steps):
        update(compiled(*random_batch(data["train"], gen, args.batch, args.block)), opt)
        sched.step()
    return compiled

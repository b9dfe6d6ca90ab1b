"""FNT: the short high-precision fine-tune that follows 4-bit training (LUQ paper, §5.2, Eq. 17).

After the 4-bit phase, train T more iterations with the backward in high precision while the weights
stay quantized; the learning rate ramps linearly from ``lr_start`` (LR_T, where the 4-bit phase
ended) to ``lr_base`` over the first T/2 iterations, then decays linearly to 0 at iteration T.

    opts = nmcompile.fnt.fnt_options(train_options)             # {"fwd_quant": "sawb", ...}
    model = torch.compile(raw_model, backend="nm", options=opts)
    sched = nmcompile.fnt.fnt_scheduler(opt, total=T, lr_start=lr_T, lr_base=lr0)
    for step in range(T): ...; opt.step(); sched.step()

nmcompile's forward quantization (SAWB) quantizes the weights *and* the activations of the GEMMs it
covers; it has no weight-only mode, so the FNT phase here keeps both quantized in the forward pass
(the paper keeps only the weights low precision). Gradient sparsity and LUQ are switched off.
"""
from __future__ import annotations

from typing import Optional

import torch

from nmcompile.passes.config import NMConfig, Part

# carried into the FNT phase: the forward quantizer, which layers it covers, and how the graph is compiled
_KEPT = NMConfig.keys_of(Part.FORWARD, Part.SCOPE, Part.COMPILE)


def fnt_schedule(step: float, total: int, lr_start: float, lr_base: float) -> float:
    """LR at FNT iteration ``step`` (0-based) of ``total``: linear from ``lr_start`` at step 0 to
    ``lr_base`` at step total/2, then linear to 0 at step ``total``; 0 after the end."""
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"total={total!r} must be a positive integer number of iterations")
    if step < 0:
        raise ValueError(f"step={step!r} must be >= 0")
    if lr_start < 0 or lr_base < 0:
        raise ValueError(f"learning rates must be >= 0, got lr_start={lr_start!r}, lr_base={lr_base!r}")
    half = total / 2
    if step <= half:
        return lr_start + (lr_base - lr_start) * (step / half)
    return lr_base * max(0.0, (total - step) / (total - half))


def fnt_scheduler(optimizer: torch.optim.Optimizer, total: int, lr_start: float,
                  lr_base: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR that drives every param group of ``optimizer`` along ``fnt_schedule``. It sets the
    groups' base LR to ``lr_base`` (any earlier scheduler's ``initial_lr`` is discarded), so after
    construction the LR is ``lr_start`` and each ``scheduler.step()`` advances one iteration."""
    if lr_base <= 0:
        raise ValueError(f"lr_base={lr_base!r} must be > 0 (the schedule is expressed relative to it)")
    fnt_schedule(0, total, lr_start, lr_base)  # validate the rest early
    for group in optimizer.param_groups:
        group["lr"] = lr_base
        group.pop("initial_lr", None)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: fnt_schedule(step, total, lr_start, lr_base) / lr_base)


def fnt_options(options: Optional[dict] = None) -> dict:
    """Backend options for the FNT phase, derived from the 4-bit phase's ``options``: no gradient
    sparsity, no LUQ, nothing else that changes only the backward; forward quantization kept (``fwd_quant="sawb"``
    when the 4-bit phase had none) together with its bit width, the layers it covers and how the graph is
    compiled (``Part.FORWARD``, ``Part.SCOPE`` and ``Part.COMPILE`` options). Options of both halves
    (``pow2_scales``, ``dense_if_faster``) are dropped: they need the gradient quantizer FNT switches off."""
    options = dict(options or {})
    out = {k: options[k] for k in _KEPT if k in options}
    if not out.get("fwd_quant"):
        out["fwd_quant"] = "sawb"
        out.pop("fwd_scales", None)  # SAWB has one scale per tensor
    NMConfig.from_options(out)  # fail early on bad values carried over
    return out

"""End-to-end gradient noise per parameter: what the optimizer sees.

The noise monitor measures each compressed GEMM locally, on its own exact operands. The parameter gradients
are what training uses, and compression of a dgrad (the gradient passed to the layers below) reaches every
layer underneath: its noise compounds with depth. ``end_to_end_noise`` runs the model's backward ``draws``
times with all compression on, independent draws each time, and once with the gradient compression off (the
same forward, quantized forward included): per parameter tensor p, with exact gradient g and draws ĝ₁…ĝ_k of
mean ḡ,

- ``signal`` = ‖g‖²;
- ``noise`` = mean ‖ĝᵢ − g‖², an unbiased estimate of E‖ĝ − g‖² (variance + bias²);
- ``variance`` = Σ‖ĝᵢ − ḡ‖²/(k − 1) and ``bias`` = ‖ḡ − g‖² − variance/k (≈ 0 for unbiased compression);
- ``cosine`` = cos(ḡ, g), how well the mean of k draws points along the exact gradient.

Like the monitor, it runs under ``torch.random.fork_rng``, takes gradients with ``torch.autograd.grad`` and
restores the module's buffers: training's gradients and random stream are not touched.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Callable, Optional

import torch

from nmcompile.passes.config import NMConfig, Part

_GRADIENT_OPTIONS = NMConfig.keys_of(Part.BACKWARD)  # what the exact reference leaves out


@dataclasses.dataclass
class ParamNoise:
    name: str
    shape: tuple
    signal: float
    noise: float
    variance: float
    bias: float
    cosine: Optional[float]

    @property
    def noise_to_signal(self) -> Optional[float]:
        return self.noise / self.signal if self.signal > 0 else None

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "shape": list(self.shape), "noise_to_signal": self.noise_to_signal}


@dataclasses.dataclass
class EndToEndNoise:
    params: list
    options: dict
    draws: int

    def find(self, name: str) -> ParamNoise:
        return next(p for p in self.params if p.name == name)

    def as_dict(self) -> dict:
        return {"schema": "nmcompile.end_to_end/1", "options": self.options, "draws": self.draws,
                "params": [p.as_dict() for p in self.params]}

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.as_dict(), indent=indent)

    def table(self, title: Optional[str] = None):
        from rich.table import Table

        from nmcompile.noise import _num

        table = Table(title=title or f"end-to-end gradient noise per parameter ({self.draws} draws)",
                      title_justify="left")
        cos = f"cos(mean of {self.draws}, g)"
        for col in ("parameter", "shape", "‖g‖²", "E‖ĝ−g‖²", "of it bias²", "noise/‖g‖²", cos):
            table.add_column(col, justify="left" if col in ("parameter", "shape") else "right")
        for p in self.params:
            table.add_row(p.name, "×".join(map(str, p.shape)), _num(p.signal), _num(p.noise), _num(p.bias),
                          _num(p.noise_to_signal), _num(p.cosine))
        return table


def exact_options(options: dict) -> dict:
    """``options`` without gradient compression: the same forward (quantized forward included), exact backward."""
    return {k: v for k, v in options.items() if k not in _GRADIENT_OPTIONS}


def end_to_end_noise(model: torch.nn.Module, *inputs, options: dict, draws: int = 8, seed: int = 0,
                     loss_fn: Optional[Callable] = None) -> EndToEndNoise:
    """Per parameter tensor of ``model``: its gradient's noise under ``options`` against the exact gradient,
    from ``draws`` independent backward passes (options as for ``backend="nm"``)."""
    from nmcompile.capture import reduce_output

    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 2:
        raise ValueError(f"draws={draws!r} must be an integer >= 2 (the variance needs two independent draws)")
    run = {"inner": "aot_eager", "lowering": "emulate"}
    NMConfig.from_options({**options, **run})  # bad options fail here
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]

    def gradients(compiled, draw_seed: int) -> list:
        torch.manual_seed(draw_seed)
        out = compiled(*inputs)
        loss = loss_fn(out) if loss_fn is not None else reduce_output(out)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            for buf, saved in buffers:
                buf.copy_(saved)
        return [torch.zeros_like(p, dtype=torch.float64) if g is None else g.detach().double()
                for p, g in zip(params, grads)]

    devices = sorted({str(t.device) for t in params if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        exact = gradients(torch.compile(model, backend="nm", options={**exact_options(options), **run}), seed)
        compressed = torch.compile(model, backend="nm", options={**options, **run})
        total = [torch.zeros_like(g) for g in exact]
        squares = [0.0] * len(exact)
        cross = [0.0] * len(exact)
        for i in range(draws):
            for j, g in enumerate(gradients(compressed, seed + 1 + i)):
                total[j] += g
                squares[j] += float(g.pow(2).sum())
                cross[j] += float((g * exact[j]).sum())
    out = []
    for (name, p), g, s, sq, cr in zip(named, exact, total, squares, cross):
        signal = float(g.pow(2).sum())
        mean = s / draws
        variance = max(0.0, (sq - float(s.pow(2).sum()) / draws) / (draws - 1))
        norm = math.sqrt(float(mean.pow(2).sum()) * signal)
        out.append(ParamNoise(name, tuple(p.shape), signal, (sq - 2 * cr) / draws + signal, variance,
                              float((mean - g).pow(2).sum()) - variance / draws,
                              float((mean * g).sum()) / norm if norm > 0 else None))
    return EndToEndNoise(out, dict(options), draws)

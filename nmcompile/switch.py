"""PrecisionSwitch: train with a compressed-gradient recipe until its noise dominates the gradient, then go on
with a more precise one, keeping the model and the optimizer as they are.

Chmiel et al. (2025, "FP4 all the way") predict that training stalls once ‖∇L‖² falls below 3·σ_q², the
quantization noise of the gradient. The noise monitor (``nmcompile.NoiseMonitor``) measures both at every
compressed update (wgrad) GEMM: ‖∇L‖² as the squared norm of the minibatch's update less the minibatch's own
variance, and E‖Ĝ−G‖² from independent draws of the compression. One batch gives noisy estimates (the first
is often negative), so the switch sums both over the last ``window`` measurements and compares those sums: when
``ratio = Σ(‖G‖² − minibatch var) / (3·Σ E‖Ĝ−G‖²)`` stays below ``threshold`` for ``patience`` measurements in a
row, it compiles the model once more under the next recipe and says so. A window, not an exponential mean:
both sums shrink by orders of magnitude over training, and an exponential mean would be ruled by the large
early measurements for long after they stopped describing the run.

    switch = nmcompile.PrecisionSwitch(model, {"quant": "luq", "fwd_quant": "sawb"}, then=[{"quant": "luq",
                                       "smp": 2}, {}], every=50, loss_fn=lambda out: out.loss)
    for step, batch in enumerate(data):
        switch.on_step(step, batch)          # measures every `every` steps; may switch before this step
        loss = switch.model(batch).loss      # the compiled model under the current recipe
        loss.backward(); opt.step(); opt.zero_grad()

Switching happens between steps: no step is lost or repeated, and the optimizer, its state and the
parameters are untouched (the same tensors). ``{}`` is dense training under the nm backend (Inductor alone).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from typing import Callable, Optional, Sequence, Union

import torch

from nmcompile.noise import NoiseMonitor, NoiseReport, windowed_stall_ratio
from nmcompile.passes.roles import is_update


@dataclasses.dataclass
class Measurement:
    step: int
    gradient: float  # Σ over the update GEMMs of ‖G‖² − minibatch variance: an estimate of ‖∇L‖² there
    noise: float  # Σ of E‖Ĝ − G‖²
    ratio: Optional[float]  # Σ gradient / (3·Σ noise) over the last `window` measurements


@dataclasses.dataclass
class SwitchEvent:
    step: int  # the first step trained under ``to``
    ratio: float
    measurements: int  # how many measurements in a row were below the threshold
    from_options: dict
    to_options: dict

    def __str__(self) -> str:
        return (f"step {self.step}: compression noise dominates the gradient (‖∇L‖²/(3·E‖Ĝ−G‖²) over the recent "
                f"measurements = "
                f"{self.ratio:.3g} for {self.measurements} measurement(s) in a row): switching from "
                f"{json.dumps(self.from_options)} to {json.dumps(self.to_options)} (compiling once more)")


class PrecisionSwitch:
    """``model`` trained under ``options``, then ``then`` (one recipe or a list, tried in order) once the
    measured compression noise dominates the gradient. ``model`` (the attribute) is the compiled model to
    call; ``events`` says when and why it switched; ``measurements`` holds every measurement."""

    def __init__(self, model: torch.nn.Module, options: dict, then: Union[dict, Sequence[dict]] = ({},), *,
                 every: int = 50, draws: int = 2, window: int = 4, threshold: float = 1.0,
                 patience: int = 2, loss_fn: Optional[Callable] = None, seed: int = 0, log=None):
        recipes = [then] if isinstance(then, dict) else list(then)
        if not recipes or not all(isinstance(r, dict) for r in recipes):
            raise ValueError(f"then={then!r} must be a dict of backend options or a non-empty list of them")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window={window!r} must be a positive integer number of measurements")
        if not threshold > 0:
            raise ValueError(f"threshold={threshold!r} must be > 0 (1 is the stall criterion itself)")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience={patience!r} must be a positive integer number of measurements")
        self.raw, self.recipes = model, [dict(options), *map(dict, recipes)]
        self.every, self.draws, self.window, self.threshold, self.patience = every, draws, window, threshold, patience
        self.loss_fn, self.seed = loss_fn, seed
        self.log = log if log is not None else (lambda msg: print(f"nmcompile: {msg}", file=sys.stderr))
        self.stage = 0
        self.events: list = []
        self.measurements: list = []
        self._compile()

    @property
    def options(self) -> dict:
        """The recipe training runs under now."""
        return self.recipes[self.stage]

    def _compile(self) -> None:
        from nmcompile.passes.config import NMConfig

        self.model = torch.compile(self.raw, backend="nm", options=self.options)
        config, _ = NMConfig.from_options(self.options)
        self._monitor = (NoiseMonitor(self.raw, self.options, every=self.every, draws=self.draws,
                                      loss_fn=self.loss_fn, seed=self.seed)
                         if config.compresses_gradients and self.stage < len(self.recipes) - 1 else None)
        self._points: list = []  # (gradient, noise) of each measurement under this recipe (restarts with each)
        self._below = 0

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def on_step(self, step: int, *inputs) -> Optional[SwitchEvent]:
        """Before training step ``step`` on ``inputs``: every ``every`` steps, measure on them and switch when
        the criterion says so (then ``self.model`` is the model compiled under the next recipe)."""
        if self._monitor is None or step % self.every:
            return None
        return self.observe(self._monitor.measure(*inputs, step=step), step)

    def observe(self, report: NoiseReport, step: int) -> Optional[SwitchEvent]:
        """Take one measurement into the window; switch if the criterion holds ``patience`` times in a row."""
        rows = [g for g in report.gemms if is_update(g.role) and g.minibatch_noise is not None]
        gradient = sum(g.signal - g.minibatch_noise for g in rows)
        noise = sum(g.compression_noise for g in rows)
        self._points.append((gradient, noise))
        ratio = windowed_stall_ratio(self._points, self.window)
        self.measurements.append(Measurement(step, gradient, noise, ratio))
        self._below = self._below + 1 if ratio is not None and ratio < self.threshold else 0
        if self._below < self.patience or self.stage == len(self.recipes) - 1:
            return None
        event = SwitchEvent(step, ratio, self._below, self.options, self.recipes[self.stage + 1])
        self.stage += 1
        self.events.append(event)
        self.log(str(event))
        self._compile()
        return event

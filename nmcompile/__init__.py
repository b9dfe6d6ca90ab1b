"""nmcompile: unbiased sparse (MVUE N:M) and 4-bit (LUQ) neural-gradient training as a
torch.compile backend: ``torch.compile(model, backend="nm", options={"sparsity": "2:4"})``."""
from __future__ import annotations

from nmcompile.end_to_end import EndToEndNoise, end_to_end_noise
from nmcompile.explain import explain
from nmcompile.functional import greedy, luq, mvue, sawb
from nmcompile.noise import NoiseMonitor, NoiseReport, noise_report
from nmcompile.report import Report
from nmcompile.passes import NMConfig
from nmcompile.switch import PrecisionSwitch
from nmcompile.version import __version__

__all__ = ["EndToEndNoise", "NMConfig", "NoiseMonitor", "NoiseReport", "PrecisionSwitch", "Report", "end_to_end_noise",
           "explain", "greedy", "luq", "mvue", "noise_report", "sawb", "SINGD", "__version__"]


def __getattr__(name: str):
    if name in ("SINGD", "optim"):  # the optimizer is optional weight: load it on first use
        import nmcompile.optim as optim

        return optim.SINGD if name == "SINGD" else optim
    raise AttributeError(f"module 'nmcompile' has no attribute {name!r}")

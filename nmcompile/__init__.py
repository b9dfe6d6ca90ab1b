"""nmcompile: unbiased sparse (MVUE N:M) and 4-bit (LUQ) neural-gradient training as a
torch.compile backend: ``torch.compile(model, backend="nm", options={"sparsity": "2:4"})``."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import pathlib
import sys


def _beside(name: str) -> None:
    """nmcompile.<name> is the checkout's top-level <name>/ folder, beside nmcompile/ (a wheel holds it in
    nmcompile/<name>/, found the usual way). Those folders have no __init__.py: a regular package of the same name
    anywhere on sys.path (Hugging Face's ``kernels``) wins over them from the checkout's root, where Python puts the
    root first on the path; here they become this package's subpackages, by location, not by sys.path."""
    here = pathlib.Path(__file__).resolve().parent
    if (here / name).is_dir() or not (here.parent / name).is_dir():
        return
    spec = importlib.machinery.ModuleSpec(f"{__name__}.{name}", None, is_package=True)
    spec.submodule_search_locations = [str(here.parent / name)]
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    setattr(sys.modules[__name__], name, module)


_beside("kernels")
_beside("passes")

import nmcompile.kernels.gemm  # noqa: F401  (registers torch.ops.nm.*: every nmcompile import runs this first)
import nmcompile.kernels.ops  # noqa: F401
from nmcompile.end_to_end import EndToEndNoise, end_to_end_noise
from nmcompile.explain import explain
from nmcompile.functional import greedy, luq, mvue, sawb
from nmcompile.noise import NoiseMonitor, NoiseReport, noise_report
from nmcompile.report import Report
from nmcompile.passes.config import NMConfig
from nmcompile.switch import PrecisionSwitch
from nmcompile.version import __version__

__all__ = ["EndToEndNoise", "NMConfig", "NoiseMonitor", "NoiseReport", "PrecisionSwitch", "Report", "end_to_end_noise",
           "explain", "greedy", "luq", "mvue", "noise_report", "sawb", "SINGD", "__version__"]


def __getattr__(name: str):
    if name in ("SINGD", "optim"):  # the optimizer is optional weight: load it on first use
        import nmcompile.optim as optim

        return optim.SINGD if name == "SINGD" else optim
    raise AttributeError(f"module 'nmcompile' has no attribute {name!r}")

"""The nm ops: N:M pruning (MVUE, greedy), LUQ and SAWB quantization.

``kernels.ops`` registers them as ``torch.ops.nm.*`` custom ops; the math lives in one module per
method and doubles as the Inductor decomposition, so the compiled ops fuse with their neighbours.
``kernels.reference`` holds independent, straightforward implementations used to check them.
Nothing here imports the passes or the public package (relative imports only).
"""
from . import ops  # noqa: F401  (registers torch.ops.nm.*)
from .grouping import uniform_shape
from .luq import luq_levels, luq_noise_shape
from .sawb import SAWB_COEFFICIENTS

__all__ = ["ops", "uniform_shape", "luq_levels", "luq_noise_shape", "SAWB_COEFFICIENTS"]

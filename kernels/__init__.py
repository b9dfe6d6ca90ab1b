"""The nm ops: N:M pruning (MVUE, greedy), LUQ and SAWB quantization.

``kernels.ops`` registers them as ``torch.ops.nm.*`` custom ops, opaque to Inductor. Their CPU
kernels are ``nm_cpu.cpp`` (built and loaded by ``kernels.cpu``); the portable torch math lives in
one module per method (``sparsity``, ``luq``, ``sawb``) and runs on other devices, or where no
C++ compiler is found; both give the same bits. ``kernels.reference`` holds independent,
straightforward implementations used to check them.
Nothing here imports the passes or the public package (relative imports only).
"""
from . import ops  # noqa: F401  (registers torch.ops.nm.*)
from .grouping import uniform_shape
from .luq import luq_levels, luq_noise_shape
from .sawb import SAWB_COEFFICIENTS

__all__ = ["ops", "uniform_shape", "luq_levels", "luq_noise_shape", "SAWB_COEFFICIENTS"]

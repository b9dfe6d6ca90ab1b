"""The nm ops: N:M pruning (MVUE, greedy), LUQ and SAWB quantization, and the exact FP8 / 2:4
GEMMs they feed under ``lowering="native"`` (``gemm``, with float8 codes from ``fp8``).

``kernels.ops`` registers them as ``torch.ops.nm.*`` custom ops, opaque to Inductor. Their CPU
kernels are ``nm_cpu.cpp`` (built and loaded by ``kernels.cpu``); the portable torch math lives in
one module per method (``sparsity``, ``luq``, ``sawb``) and runs on other devices, or where no
C++ compiler is found; both give the same bits. ``kernels.reference`` holds independent,
straightforward implementations used to check them.
Nothing here imports the passes or the public package (relative imports only).
"""
from . import gemm, ops  # noqa: F401  (register torch.ops.nm.*)
from .grouping import uniform_shape
from .luq import luq_levels, luq_noise_shape
from .sawb import SAWB_COEFFICIENTS

__all__ = ["ops", "uniform_shape", "luq_levels", "luq_noise_shape", "SAWB_COEFFICIENTS"]

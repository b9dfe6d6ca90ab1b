"""``dense_if_faster``: a Linear layer's GEMMs go on int8 only where that is faster on this machine.

Per layer, not per GEMM: the forward GEMM's quantized W and X are also what its dgrad and wgrad read, so a layer
is either on int8 with its three GEMMs or left as it was. The two costs, from ``kernels.timing`` (measured once
per machine and shape, cached):

- dense: the three GEMMs in the layer's dtype (fp32, or bf16 under autocast);
- int8: the three ``torch._int_mm`` calls, the forward quantizer over X and W, the gradient quantizer over the
  output gradient twice (once per backward GEMM, each along its own K), and the rescaling of the three int32
  outputs (float64, or with ``pow2_scales`` fp32), each of the last three as measured seconds per element.

Where dense is faster it is also more faithful, so the layer is left dense, and its records say so with both costs.
"""
from __future__ import annotations

from typing import Optional

import torch

from nmcompile.kernels import timing
from nmcompile.kernels.catalog import OPS
from nmcompile.kernels.gemm import Lowering, int8_cpu_support
from .config import NMConfig


def _quantizer_seconds(name: str, params: dict, dtype: torch.dtype) -> float:
    spec = OPS[name]
    label = spec.transform_label(params)
    return timing.per_element_seconds(label, dtype, lambda x: spec.apply(x, **params))


def _rescale_seconds(dtype: torch.dtype, pow2: bool) -> float:
    from nmcompile.kernels import cpu

    if pow2:  # one fp32 multiply by a power of two, inside the conversion pass of Inductor's fused kernel
        return timing.per_element_seconds(f"int32 to {dtype}", torch.int32, lambda s: s.to(dtype))
    if cpu.available():  # the one-pass scaling of an int8 GEMM's int32 sums, as Inductor's fused kernel does it
        return timing.per_element_seconds(f"int8 rescale to {dtype}", torch.int32,
                                          lambda s: cpu.int8_scale(s, 0.5, None, dtype))
    return timing.per_element_seconds(f"int32 to {dtype}", torch.int32, lambda s: s.to(dtype))


def layer_costs(m: int, n: int, k: int, dtype: torch.dtype, config: NMConfig) -> tuple[float, float]:
    """(int8 seconds, dense seconds) of one step of a Linear layer whose forward GEMM is [m, k] @ [k, n] (X
    times the transposed weight), its dgrad [m, n] @ [n, k] and its wgrad [n, m] @ [m, k]."""
    dense = timing.mm_seconds(m, n, k, dtype) + timing.mm_seconds(m, k, n, dtype) + timing.mm_seconds(n, k, m, dtype)
    gemms = (timing.int_mm_seconds(m, n, k, b_transposed=True) + timing.int_mm_seconds(m, k, n, b_transposed=False)
             + timing.int_mm_seconds(n, k, m, b_transposed=False))
    rows = lambda scales: {"dim": 1} if scales == "row" else {}  # noqa: E731
    fwd = _quantizer_seconds(config.fwd_quant, {**config.params_for(OPS[config.fwd_quant]), **rows(config.fwd_scales)},
                             dtype)
    grad = _quantizer_seconds(config.quant, {**config.params_for(OPS[config.quant]), **rows(config.scales)}, dtype)
    rescale = _rescale_seconds(dtype, config.pow2_scales)
    int8 = gemms + fwd * (m * k + n * k) + grad * 2 * m * n + rescale * (m * n + m * k + n * k)
    return int8, dense


def dense_is_faster(m, n, k, dtype: torch.dtype, device: torch.device, config: NMConfig) -> Optional[str]:
    """Why this layer stays dense under ``dense_if_faster``, or None where int8 is faster (or not on this CPU)."""
    if device.type != "cpu" or config.lowering == Lowering.EMULATE or int8_cpu_support() is not None:
        return None
    if not all(isinstance(size, int) for size in (m, n, k)):
        return None  # symbolic shapes: the lowering leaves these dense and says why
    int8, dense = layer_costs(m, n, k, dtype, config)
    if int8 < dense:
        return None
    name = str(dtype).replace("torch.", "")
    return (f"dense is faster on this CPU (dense_if_faster=True): the layer's 3 GEMMs take {dense * 1e3:.3g} ms in "
            f"{name}, {int8 * 1e3:.3g} ms on int8 with their quantizers and rescaling (measured, "
            f"{timing.cache_file().name})")

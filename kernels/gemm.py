"""Low-precision GEMM ops for ``lowering="native"``: exact FP8 and 2:4 semi-structured sparse.

- ``nm::fp8_mm(a, scale_a, b, scale_b, bias, out_dtype)``: (a·scale_a) @ (b·scale_b) (+ bias) for
  float8 codes (``kernels/fp8.py``), fp32 accumulation: ``torch._scaled_mm`` with per-tensor scales,
  on CUDA (sm89+) and on CPU alike.
- ``nm::sparse24_mm(a, b, scale_a, scale_b, out_dtype)``: a @ b where ``a`` keeps at most 2 nonzeros
  in every aligned group of 4 along its last dim (K), in bf16/fp16, or float8 codes with scales.
  CUDA: cuSPARSELt (``torch._cslt_compress`` + ``torch._cslt_sparse_mm``; sm80+); the packed tensor
  never leaves the op (the aten ops have no fake kernels). CPU: checks the structure, then runs
  the same product densely, so the native graph is tested without a GPU.

Both are opaque to Inductor (extern kernels) and have fake kernels. ``native_support`` says where a
device cannot run them, and why; the graph pass falls back to the dense GEMM there.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .cuda import or_reference

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_HALF = (torch.bfloat16, torch.float16)


def cusparselt_version() -> Optional[int]:
    """cuSPARSELt's version as torch reports it (e.g. 800 for 0.8.0), None where it is absent."""
    try:
        return torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None
    except Exception:  # noqa: BLE001  (a CPU build may lack the module's internals)
        return None


def _row_major(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 and t.stride(0) >= max(1, t.shape[-1]) else t.contiguous()


def _col_major(t: Tensor) -> Tensor:
    # what _scaled_mm / cuSPARSELt's fp8 path want for the right operand on CUDA
    return t if t.stride(0) == 1 and t.stride(1) >= max(1, t.shape[0]) else t.t().contiguous().t()


def _out_shape(a: Tensor, b: Tensor) -> tuple:
    torch._check(
        a.dim() == 2 and b.dim() == 2,
        lambda: f"nm GEMM ops take 2-D operands, got {tuple(a.shape)} and {tuple(b.shape)}",
    )
    torch._check(
        a.shape[1] == b.shape[0], lambda: f"nm GEMM ops: inner sizes differ, {tuple(a.shape)} @ {tuple(b.shape)}"
    )
    return a.shape[0], b.shape[1]


def _check_scaled(a: Tensor, scale_a: Tensor, b: Tensor, scale_b: Tensor) -> None:
    if a.dtype not in _FP8 or b.dtype not in _FP8:
        raise ValueError(f"nm.fp8_mm: operands must be float8 codes, got {a.dtype} and {b.dtype}")
    for name, s in (("scale_a", scale_a), ("scale_b", scale_b)):
        if s.numel() != 1 or s.dtype != torch.float32:
            raise ValueError(
                f"nm.fp8_mm: {name} must be one fp32 value per tensor, got {s.dtype} of shape {tuple(s.shape)}"
            )


def _dequantized_mm(a: Tensor, scale_a: Tensor, b: Tensor, scale_b: Tensor, out_dtype: torch.dtype) -> Tensor:
    return ((a.float() * scale_a) @ (b.float() * scale_b)).to(out_dtype)


@torch.library.custom_op("nm::fp8_mm", mutates_args=())
def fp8_mm(
    a: Tensor, scale_a: Tensor, b: Tensor, scale_b: Tensor, bias: Optional[Tensor], out_dtype: torch.dtype
) -> Tensor:
    """(a·scale_a) @ (b·scale_b) + bias in ``out_dtype``, fp32 accumulation."""
    _out_shape(a, b)
    _check_scaled(a, scale_a, b, scale_b)
    # a bias is fused where _scaled_mm takes it (CUDA refuses one with an fp32 output)
    fuse = bias is not None and bias.dtype == out_dtype and (a.device.type == "cpu" or out_dtype != torch.float32)

    def scaled_mm():
        return torch._scaled_mm(
            _row_major(a),
            _col_major(b),
            scale_a.reshape(()),
            scale_b.reshape(()),
            bias=bias if fuse else None,
            out_dtype=out_dtype,
        )

    def reference():
        out = _dequantized_mm(a, scale_a, b, scale_b, out_dtype)
        return (out + bias).to(out_dtype) if fuse else out

    out = or_reference(scaled_mm, reference, "torch._scaled_mm") if a.device.type == "cuda" else scaled_mm()
    return out if bias is None or fuse else (out + bias).to(out_dtype)


@fp8_mm.register_fake
def _(a, scale_a, b, scale_b, bias, out_dtype):
    return a.new_empty(_out_shape(a, b), dtype=out_dtype)


def check_24(a: Tensor) -> None:
    """Raise a ValueError naming the first aligned group of 4 along a's last dim with > 2 nonzeros."""
    rows, k = a.shape
    if k % 4:
        raise ValueError(f"nm.sparse24_mm: K={k} is not a multiple of 4")
    bits = a.view(torch.uint8) if a.dtype in _FP8 else a
    nonzero = (bits & 0x7F) != 0 if a.dtype in _FP8 else bits != 0  # -0 counts as zero
    counts = nonzero.reshape(rows, k // 4, 4).sum(-1)
    bad = (counts > 2).nonzero()
    if len(bad):
        r, g = (int(i) for i in bad[0])
        raise ValueError(
            f"nm.sparse24_mm: row {r}, columns {4 * g}..{4 * g + 3} hold {int(counts[r, g])} nonzeros; "
            "a 2:4 operand has at most 2 in every aligned group of 4 along K"
        )


@torch.library.custom_op("nm::sparse24_mm", mutates_args=())
def sparse24_mm(
    a: Tensor, b: Tensor, scale_a: Optional[Tensor], scale_b: Optional[Tensor], out_dtype: torch.dtype
) -> Tensor:
    """a @ b for a 2:4-sparse ``a`` (along K); float8 codes when scales are given."""
    _out_shape(a, b)
    scaled = scale_a is not None
    if scaled:
        _check_scaled(a, scale_a, b, scale_b)
    elif a.dtype != b.dtype:
        raise ValueError(f"nm.sparse24_mm: operands must share a dtype, got {a.dtype} and {b.dtype}")
    if a.device.type == "cuda":

        def cusparselt():
            packed = torch._cslt_compress(_row_major(a))
            if scaled:  # e4m3 only; torch 2.11 wants the dense operand column-major and a 16-bit output
                return torch._cslt_sparse_mm(
                    packed, _col_major(b), alpha=(scale_a * scale_b).reshape(1).float(), out_dtype=out_dtype
                )
            return torch._cslt_sparse_mm(packed, b)

        dense = (lambda: _dequantized_mm(a, scale_a, b, scale_b, out_dtype)) if scaled else (lambda: torch.mm(a, b))
        return or_reference(cusparselt, dense, "cuSPARSELt (torch._cslt_sparse_mm)")
    check_24(a)
    if scaled:
        return torch._scaled_mm(a, b, scale_a.reshape(()), scale_b.reshape(()), out_dtype=out_dtype)
    return torch.mm(a, b)


@sparse24_mm.register_fake
def _(a, b, scale_a, scale_b, out_dtype):
    return a.new_empty(_out_shape(a, b), dtype=out_dtype)


# -- where a device can run them ------------------------------------------------------------------
# cuSPARSELt minimums (sparse rows, sparse cols, dense rows, dense cols); each size a multiple too.
_CSLT_MIN = {"half": (16, 16, 8, 8), "fp8": (32, 32, 16, 16)}


def native_support(
    kernel: str, device: torch.device, capability: Optional[tuple], shape: tuple, dtype: torch.dtype
) -> Optional[str]:
    """None if ``device`` can run ``kernel`` ("fp8", "2:4" or "2:4 fp8") on an (M, N, K) GEMM whose
    output is ``dtype``; otherwise why not. ``capability``: CUDA's (major, minor), None elsewhere."""
    m, n, k = shape
    if device.type == "cpu":
        return None  # _scaled_mm with per-tensor scales, and the structure-checking 2:4 op
    if device.type != "cuda":
        return f"no native kernels on {device.type}"
    if kernel == "fp8":
        if capability < (8, 9):
            return f"FP8 GEMMs need CUDA capability >= 8.9, this GPU has {capability[0]}.{capability[1]}"
        if k % 16 or n % 16:
            return f"torch._scaled_mm needs K and N multiples of 16, got K={k}, N={n}"
        return None
    if cusparselt_version() is None:
        return "cuSPARSELt is not available in this torch build"
    if capability < (8, 0):
        return f"2:4 sparse GEMMs need CUDA capability >= 8.0, this GPU has {capability[0]}.{capability[1]}"
    if kernel == "2:4 fp8" and capability < (8, 9):
        return f"2:4 FP8 GEMMs need CUDA capability >= 8.9, this GPU has {capability[0]}.{capability[1]}"
    if kernel == "2:4" and dtype not in _HALF:
        return f"2:4 tensor-core GEMMs take bf16/fp16 operands, got {str(dtype).replace('torch.', '')}"
    if kernel == "2:4 fp8" and dtype not in _HALF:
        return "cuSPARSELt's FP8 GEMM gives bf16/fp16 outputs only (torch 2.11), this GEMM's output is " + str(
            dtype
        ).replace("torch.", "")
    rows, cols, dense_rows, dense_cols = _CSLT_MIN["fp8" if kernel == "2:4 fp8" else "half"]
    for what, size, least in (("M", m, rows), ("K", k, cols), ("N", n, dense_cols)):
        if size < least or size % least:
            return f"cuSPARSELt needs {what} >= {least} and a multiple of it, got {what}={size}"
    return None

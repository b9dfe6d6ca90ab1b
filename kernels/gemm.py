"""Low-precision GEMM ops for the native lowering: exact INT8, exact FP8 and 2:4 semi-structured sparse.

- ``nm::int8_mm(a, scale_a, b, scale_b, bias, out_dtype)``: (a·scale_a) @ (b·scale_b) (+ bias) for
  int8 codes (``kernels/int8.py``): ``torch._int_mm`` sums the products in int32, exactly (K is split
  where a sum could leave int32), then one float64 multiply by the scales (and the bias) rounded once
  to ``out_dtype``. CPU: oneDNN (AVX512-VNNI, AMX); CUDA: IMMA tensor cores (sm80+). The native
  lowering inlines its aten ops (``int8_gemm``), so Inductor fuses the scaling into what follows.
- ``nm::fp8_mm(a, scale_a, b, scale_b, bias, out_dtype)``: (a·scale_a) @ (b·scale_b) (+ bias) for
  float8 codes (``kernels/fp8.py``), fp32 accumulation: ``torch._scaled_mm`` with per-tensor scales,
  on CUDA (sm89+) and on CPU alike.
- ``nm::sparse24_mm(a, b, scale_a, scale_b, out_dtype)``: a @ b where ``a`` keeps at most 2 nonzeros
  in every aligned group of 4 along its last dim (K), in bf16/fp16, or float8 codes with scales.
  CUDA: cuSPARSELt (``torch._cslt_compress`` + ``torch._cslt_sparse_mm``; sm80+); the packed tensor
  never leaves the op (the aten ops have no fake kernels). CPU: checks the structure, then runs
  the same product densely, so the native graph is tested without a GPU.

Both are opaque to Inductor (extern kernels) and have fake kernels. ``KERNELS`` describes each GEMM
kernel (operands, where it runs and why not, how records name it, its speed model); the graph pass
falls back to the dense GEMM where a device cannot run one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
from typing import Callable, Optional

import torch
from torch import Tensor

from . import cpu
from .cuda import or_reference
from .int8 import scaled_sums

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


def _check_codes(op: str, a: Tensor, scale_a: Tensor, b: Tensor, scale_b: Tensor, dtypes: tuple, what: str) -> None:
    """Both operands are codes of ``dtypes`` and both scales one fp32 value each, or a ValueError saying which not."""
    if a.dtype not in dtypes or b.dtype not in dtypes:
        raise ValueError(f"nm.{op}: operands must be {what}, got {a.dtype} and {b.dtype}")
    for name, s in (("scale_a", scale_a), ("scale_b", scale_b)):
        if s.numel() != 1 or s.dtype != torch.float32:
            raise ValueError(
                f"nm.{op}: {name} must be one fp32 value per tensor, got {s.dtype} of shape {tuple(s.shape)}"
            )


def _check_scaled(a: Tensor, scale_a: Tensor, b: Tensor, scale_b: Tensor) -> None:
    _check_codes("fp8_mm", a, scale_a, b, scale_b, _FP8, "float8 codes")


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


# The largest K whose int32 sums of int8 products cannot overflow: K·127·127 < 2^31 (128·128 for -128).
INT32_K = (2**31 - 1) // (128 * 128)


def _check_int8(a: Tensor, scale_a: Tensor, b: Tensor, scale_b: Tensor) -> None:
    """int8 codes; scales one fp32 value per tensor, or one per row of a ([M, 1]) / column of b ([1, N])."""
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise ValueError(f"nm.int8_mm: operands must be int8 codes, got {a.dtype} and {b.dtype}")
    for name, s, rows in (("scale_a", scale_a, (a.shape[0], 1)), ("scale_b", scale_b, (1, b.shape[1]))):
        if s.dtype != torch.float32 or (s.numel() != 1 and tuple(s.shape) != rows):
            raise ValueError(f"nm.int8_mm: {name} must be fp32, one value or of shape {rows} (per row), got "
                             f"{s.dtype} of shape {tuple(s.shape)}")


def int_sums(a: Tensor, b: Tensor) -> Tensor:
    """The exact integer sums a @ b of int8 operands: int32 from ``torch._int_mm``, or int64 where K is
    above ``INT32_K`` (the K chunks' int32 sums added in int64)."""
    k = a.shape[1]
    if k <= INT32_K:
        return torch._int_mm(a, b)
    sums = None
    for start in range(0, k, INT32_K):
        part = torch._int_mm(a[:, start:start + INT32_K], b[start:start + INT32_K]).long()
        sums = part if sums is None else sums + part
    return sums


def int8_gemm(a: Tensor, scale_a: Tensor, b: Tensor, scale_b: Tensor, bias: Optional[Tensor],
              out_dtype: torch.dtype, pow2: bool = False) -> Tensor:
    """(a·scale_a) @ (b·scale_b) + bias for int8 codes: exact integer sums, then one float64 multiply
    by the scales (and the bias) rounded once to ``out_dtype``; with ``pow2`` (both scales powers of
    two) one fp32 multiply instead (``int8.scaled_sums``). Plain aten ops: the native lowering
    puts them in the graph as they are, so Inductor fuses the scaling into the GEMM output's consumer
    (GELU, a residual add) instead of writing and reading the output once more."""
    if a.device.type == "cuda":  # the layouts cuBLASLt's int8 GEMM takes
        a, b = _row_major(a), _col_major(b)
    return scaled_sums(int_sums(a, b), scale_a, scale_b, bias, out_dtype, pow2)


@torch.library.custom_op("nm::int8_mm", mutates_args=())
def int8_mm(
    a: Tensor, scale_a: Tensor, b: Tensor, scale_b: Tensor, bias: Optional[Tensor], out_dtype: torch.dtype
) -> Tensor:
    """(a·scale_a) @ (b·scale_b) + bias in ``out_dtype``: exact int32 sums, rounded once (kernels/int8.py)."""
    _out_shape(a, b)
    _check_int8(a, scale_a, b, scale_b)
    return int8_gemm(a, scale_a, b, scale_b, bias, out_dtype)


@int8_mm.register_kernel("cpu")
def _(a, scale_a, b, scale_b, bias, out_dtype):
    # eagerly, the scaling in one pass of the C++ kernels (in graphs Inductor fuses int8_gemm's)
    _out_shape(a, b)
    _check_int8(a, scale_a, b, scale_b)
    per_row = scale_a.numel() != 1 or scale_b.numel() != 1
    if (out_dtype not in cpu.DTYPES or not cpu.available() or a.shape[1] > INT32_K or 0 in (*a.shape, b.shape[1])
            or per_row):
        return int8_gemm(a, scale_a, b, scale_b, bias, out_dtype)
    return cpu.int8_scale(torch._int_mm(a, b), float(scale_a) * float(scale_b), bias, out_dtype)


@int8_mm.register_fake
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


# -- the kernels, described --------------------------------------------------------------------
# cuSPARSELt minimums (sparse rows, sparse cols, dense rows, dense cols); each size a multiple too.
_CSLT_MIN = {"half": (16, 16, 8, 8), "fp8": (32, 32, 16, 16)}
_SHORT = {torch.int8: "int8", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
          torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _fp8_support(capability: tuple, shape: tuple, dtype: torch.dtype) -> Optional[str]:
    m, n, k = shape
    if capability < (8, 9):
        return f"FP8 GEMMs need CUDA capability >= 8.9, this GPU has {capability[0]}.{capability[1]}"
    if k % 16 or n % 16:
        return f"torch._scaled_mm needs K and N multiples of 16, got K={k}, N={n}"
    return None


def _sparse_support(fp8: bool):
    def support(capability: tuple, shape: tuple, dtype: torch.dtype) -> Optional[str]:
        m, n, k = shape
        if cusparselt_version() is None:
            return "cuSPARSELt is not available in this torch build"
        if capability < (8, 0):
            return f"2:4 sparse GEMMs need CUDA capability >= 8.0, this GPU has {capability[0]}.{capability[1]}"
        if fp8 and capability < (8, 9):
            return f"2:4 FP8 GEMMs need CUDA capability >= 8.9, this GPU has {capability[0]}.{capability[1]}"
        if not fp8 and dtype not in _HALF:
            return f"2:4 tensor-core GEMMs take bf16/fp16 operands, got {_dtype_name(dtype)}"
        if fp8 and dtype not in _HALF:
            return ("cuSPARSELt's FP8 GEMM gives bf16/fp16 outputs only (torch 2.11), this GEMM's output is "
                    + _dtype_name(dtype))
        rows, cols, _, dense_cols = _CSLT_MIN["fp8" if fp8 else "half"]
        for what, size, least in (("M", m, rows), ("K", k, cols), ("N", n, dense_cols)):
            if size < least or size % least:
                return f"cuSPARSELt needs {what} >= {least} and a multiple of it, got {what}={size}"
        return None

    return support


def _int8_support(capability: tuple, shape: tuple, dtype: torch.dtype) -> Optional[str]:
    m, n, k = shape
    if capability < (8, 0):
        return ("INT8 tensor-core GEMMs (torch._int_mm) need CUDA capability >= 8.0, this GPU has "
                f"{capability[0]}.{capability[1]}")
    if m <= 16 or k % 8 or n % 8:
        return f"torch._int_mm on CUDA needs M > 16 and K, N multiples of 8, got M={m}, K={k}, N={n}"
    return None


_int8_on_cpu: Optional[str] = None  # why int8 GEMMs do not pay or are not exact on this CPU ("": they are)


def int8_cpu_support() -> Optional[str]:
    """None where this CPU runs ``torch._int_mm`` fast and exactly, else why not (decided once).

    Fast: oneDNN's int8 GEMMs use AVX512-VNNI or AMX (without them it falls back to instructions whose
    int16 intermediate sums can saturate). Exact: a probe with the largest codes of both signs, whose
    sums need every bit of int32, against the int64 product."""
    global _int8_on_cpu
    if _int8_on_cpu is None:
        if not (torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported()):
            _int8_on_cpu = "this CPU has neither AVX512-VNNI nor AMX: its int8 GEMMs are neither fast nor exact"
        else:
            from torch._subclasses.fake_tensor import unset_fake_temporarily

            with unset_fake_temporarily():  # asked while a graph is traced: real tensors
                _int8_on_cpu = _probe_int8()
    return _int8_on_cpu or None


def _probe_int8() -> str:
    """'' if torch._int_mm gives the int64 product on codes ±127 (sums near ±2^26 and of mixed signs)."""
    g = torch.Generator().manual_seed(0)
    a = (torch.randint(0, 2, (32, 4096), generator=g, dtype=torch.int8) * 2 - 1) * 127
    a[0] = 127
    b = (torch.randint(0, 2, (4096, 24), generator=g, dtype=torch.int8) * 2 - 1) * 127
    b[:, 0] = 127
    exact = torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long())
    return "" if exact else "torch._int_mm is not exact on this CPU (a probe with codes ±127 differs)"


_cpu_reference_kernels = False


@contextlib.contextmanager
def cpu_reference_kernels():
    """Let the lowering choose the FP8 kernels on CPU inside this block: ``torch._scaled_mm`` there is
    a scalar reference (about 0.1 GFLOP/s), for tests of the GPU graph, never for training."""
    global _cpu_reference_kernels
    before, _cpu_reference_kernels = _cpu_reference_kernels, True
    try:
        yield
    finally:
        _cpu_reference_kernels = before


def kernel_choice_key() -> str:
    """What, besides the graph and the options, decides the kernels the lowering picks in this process:
    part of the compile caches' key, so that a cache never serves a graph lowered under other rules."""
    return f"cpu_reference={_cpu_reference_kernels}|int8_cpu={int8_cpu_support()}"


class Codes(str, enum.Enum):
    """The low-precision codes both operands of a kernel are (with per-tensor or per-row fp32 scales)."""

    FLOAT8 = "float8"
    INT8 = "int8"

    __str__ = str.__str__


class CpuUse(str, enum.Enum):
    """What a kernel is for on a CPU."""

    FAST = "fast"  # it pays
    CHECK = "check"  # correct, no faster than dense: lowering="native" only, to test the native graph
    REFERENCE = "reference"  # torch's scalar reference: only inside cpu_reference_kernels()

    __str__ = str.__str__


class Lowering(str, enum.Enum):
    """Which kernels run the GEMMs the rewrite touched (``passes/lowering.py``)."""

    AUTO = "auto"  # the exact low-precision kernels that pay on the device; the rest stay ordinary GEMMs
    EMULATE = "emulate"  # ordinary GEMMs on the compressed values in the input dtype: the same numbers
    NATIVE = "native"  # also the CPU's structure-checking 2:4 product, to test the native graph

    __str__ = str.__str__


@dataclasses.dataclass(frozen=True)
class GemmKernel:
    """One GEMM kernel a recorded GEMM can run on: what its operands must be, where it runs, how
    records name it, and its speed model (the report's tensor-core speedup column)."""

    name: str
    op: Optional[str]  # the nm op that runs it (None: the ordinary aten GEMM)
    codes: Optional[Codes]  # what codes both operands are (None: values in the input dtype)
    sparse24: bool  # one operand is 2:4 along K (it goes left)
    operands: str  # in words
    events: tuple[str, ...]  # the profiler's aten events that do its math
    # Peak tensor-core math rate vs dense bf16 on an H100 SXM (TFLOPS without / with 2:4 sparsity: BF16
    # 989 / 1979, FP8 and INT8 1979 / 3958): an upper bound on what the kernel buys, not an end-to-end speedup.
    tc_speedup: float
    tc_label: str
    cuda_support: Optional[Callable] = None  # (capability, (M, N, K), out dtype) -> None or why not
    cpu: CpuUse = CpuUse.FAST
    cpu_support: Optional[Callable[[], Optional[str]]] = None

    @property
    def float8(self) -> bool:
        return self.codes == Codes.FLOAT8

    def support(self, device: torch.device, capability: Optional[tuple], shape: tuple,
                dtype: torch.dtype, lowering: Lowering = Lowering.NATIVE) -> Optional[str]:
        """None if ``device`` can run this kernel on an (M, N, K) GEMM with output ``dtype`` under
        ``lowering`` (auto or native), else why not."""
        if device.type == "cpu":
            if self.cpu == CpuUse.REFERENCE and not _cpu_reference_kernels:
                return (f"{self.name} GEMMs on CPU run torch's scalar reference (about 0.1 GFLOP/s), "
                        "which only tests select")
            if self.cpu == CpuUse.CHECK and lowering == Lowering.AUTO:
                return f"{self.name} on CPU is a dense GEMM after a structure check (lowering='native' runs it)"
            return self.cpu_support() if self.cpu_support is not None else None
        if device.type != "cuda":
            return f"no native kernels on {device.type}"
        return self.cuda_support(capability, shape, dtype)

    def use(self, formats: tuple, device: torch.device, dtype: torch.dtype) -> "KernelUse":
        """The record of this kernel running with operand ``formats`` (dtypes, left and right)."""
        if self.float8 and not self.sparse24:
            label = "fp8 " + "×".join(sorted({_SHORT[f] for f in formats}, reverse=True))
            impl = "scaled_mm"
        elif self.codes == Codes.INT8:
            label, impl = "int8", "int_mm"
        elif self.sparse24:
            impl = "cusparselt" if device.type == "cuda" else "cpu"
            label = f"2:4 {impl} " + ("fp8" if self.float8 else _SHORT[dtype])
        else:
            label, impl = self.name, ""
        return KernelUse(label, self.name, tuple(_SHORT[f] for f in formats), impl)


class KernelUse(str):
    """The kernel a GEMM runs on. Its value is the label records and reports print ("dense", "fp8 e4m3",
    "fp8 e5m2×e4m3", "2:4 cusparselt bf16", "2:4 cpu fp8"); ``kernel`` names its :class:`GemmKernel`,
    ``formats`` the operands' dtypes, ``impl`` the implementation that runs it."""

    kernel: str
    formats: tuple
    impl: str

    def __new__(cls, label: str, kernel: str, formats: tuple = (), impl: str = "") -> "KernelUse":
        self = super().__new__(cls, label)
        self.kernel, self.formats, self.impl = kernel, tuple(formats), impl
        return self

    def __getnewargs__(self):
        return str(self), self.kernel, self.formats, self.impl

    @property
    def spec(self) -> GemmKernel:
        return KERNELS[self.kernel]

    @property
    def native(self) -> bool:
        """It runs on a low-precision or sparse kernel, not the ordinary GEMM in the input dtype."""
        return self.spec is not DENSE

    @classmethod
    def from_label(cls, label: str) -> "KernelUse":
        """The use a label alone names (reports before schema 3 kept only the label), or a ValueError."""
        sparse = label.startswith("2:4 ")
        kernel = ("fp8" if label.startswith("fp8 ") else "2:4 fp8" if sparse and label.endswith(" fp8")
                  else "2:4" if sparse else label)
        if kernel not in KERNELS:
            raise ValueError(f"kernel label {label!r} names no kernel; kernels: {', '.join(KERNELS)}")
        return cls(label, kernel)

    def as_dict(self) -> dict:
        return {"kernel": self.kernel, "formats": list(self.formats), "impl": self.impl}


DENSE = GemmKernel("dense", None, codes=None, sparse24=False, operands="the input dtype on both sides",
                   events=("aten::mm", "aten::bmm", "aten::addmm", "aten::convolution", "aten::convolution_backward",
                           "aten::_convolution", "aten::matmul", "aten::linear", "aten::baddbmm",
                           "aten::mkldnn_convolution", "aten::thnn_conv2d"),
                   tc_speedup=1.0, tc_label="dense bf16")
SPARSE24_FP8 = GemmKernel("2:4 fp8", "sparse24_mm", codes=Codes.FLOAT8, sparse24=True,
                          operands="a 2:4 gradient's e4m3 codes × e4m3 codes",
                          events=("aten::_cslt_sparse_mm", "aten::_scaled_mm"), tc_speedup=4.0,
                          tc_label="2:4 sparse TC + FP8 TC", cuda_support=_sparse_support(fp8=True),
                          cpu=CpuUse.REFERENCE)
FP8 = GemmKernel("fp8", "fp8_mm", codes=Codes.FLOAT8, sparse24=False, operands="float8 codes × float8 codes",
                 events=("aten::_scaled_mm",), tc_speedup=2.0, tc_label="FP8 TC",
                 cuda_support=_fp8_support, cpu=CpuUse.REFERENCE)
INT8 = GemmKernel("int8", "int8_mm", codes=Codes.INT8, sparse24=False,
                  operands="int8 codes × int8 codes (exact int32 sums)", events=("aten::_int_mm",),
                  tc_speedup=2.0, tc_label="INT8 TC", cuda_support=_int8_support, cpu_support=int8_cpu_support)
SPARSE24 = GemmKernel("2:4", "sparse24_mm", codes=None, sparse24=True,
                      operands="a 2:4 gradient in bf16/fp16 × the other operand",
                      events=("aten::_cslt_sparse_mm",), tc_speedup=2.0, tc_label="2:4 sparse TC",
                      cuda_support=_sparse_support(fp8=False), cpu=CpuUse.CHECK)

# In the lowering's order of preference: FP8 before INT8 where both run (sm89+; on CPU FP8 never runs
# outside tests), a 2:4 gradient in 16 bits only where no exact codes kernel took the GEMM.
KERNELS: dict[str, GemmKernel] = {k.name: k for k in (SPARSE24_FP8, FP8, INT8, SPARSE24, DENSE)}
DENSE_USE = KernelUse("dense", "dense")


def kernel_for(sparse24: bool, float8: bool) -> GemmKernel:
    """The kernel whose operands are exactly these (float8: low-precision codes, FP8 on the GPUs the
    speed model describes): what a GEMM with such operands could run on."""
    codes = Codes.FLOAT8 if float8 else None
    return next(k for k in KERNELS.values() if k.sparse24 == sparse24 and k.codes == codes)

"""``torch.ops.nm.*``: the nm custom ops, their fake kernels, and their kernels per device.

The ops are deterministic functions of their inputs. Randomness enters through ``u``: either the
uniforms themselves (any strides), or int64 seeds from which the kernel derives the very same
uniforms that ``kernels.random.uniform`` gives, without writing them to memory. The graph pass and
the functional API pass seeds drawn from torch's generator, so ``torch.manual_seed`` reproduces a
run, eager or compiled; tests pass explicit uniforms to compare with the reference.

Inductor sees the ops as opaque calls (extern kernels), never as inlined math: on CPU they run the
precompiled kernels of ``kernels.cpu``, on CUDA the Triton kernels of ``kernels.cuda``; where those
cannot run (no compiler, no Triton, a pattern they do not cover) and on other devices, the portable
torch math of ``sparsity``/``luq``/``sawb``, which gives the same results. Outputs have x's memory layout (as
``torch.empty_like``), so a transposed gradient operand stays transposed for the GEMM.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import cpu, cuda
from .absmax import absmax_math, check_bits as check_absmax_bits
from .fp8 import luq_codes, luq_format, sawb_codes
from .int8 import int8_codes
from .grouping import uniform_shape
from .catalog import ABSMAX, LUQ, Kind, OpSpec, Stage, ops_of
from .luq import luq_levels, luq_noise_shape
from .random import draw_seed, uniform
from .sawb import SAWB_COEFFICIENTS, sawb_math, scale_bits
from .sr import kernel_bits
from .scales import check_dim, scale_shape
from .sparsity import greedy_math, mvue_math


def _seeded(u: Tensor) -> bool:
    return not u.is_floating_point()


def _check_uniforms(x: Tensor, u: Tensor, expected: tuple, op: str, seeds: tuple) -> None:
    if _seeded(u):
        if u.dtype != torch.int64 or u.dim() != len(seeds) or (seeds and u.shape[0] < 1):
            raise ValueError(f"nm.{op}: integer u must be int64 seeds of shape {seeds or '()'}, got "
                             f"{u.dtype} of shape {tuple(u.shape)}")
    elif tuple(u.shape) != tuple(expected):
        raise ValueError(
            f"nm.{op}: uniforms have shape {tuple(u.shape)}, expected {tuple(expected)} for input {tuple(x.shape)}"
        )


def _like(x: Tensor, y: Tensor) -> Tensor:
    """``y`` in the layout the fake kernels promise (``torch.empty_like(x)``)."""
    out = torch.empty_like(x)
    return y if y.stride() == out.stride() else out.copy_(y)


def _on_cpu_kernels(x: Tensor, m: int = 2) -> bool:
    return x.dtype in cpu.DTYPES and m <= 256 and cpu.available()


def _triton(x: Tensor, kernel, portable, op: str, m: int = 2) -> Tensor:
    """On CUDA: the Triton kernel where one covers ``x`` (and, should it fail, the portable math with
    one warning), else the portable math."""
    if x.dtype in cpu.DTYPES and cuda.available() and cuda.prune_supported(m):
        return cuda.or_reference(kernel, portable, f"nm.{op}'s Triton kernel")
    return portable()


def _mvue_torch(x: Tensor, u: Tensor, n: int, m: int, dim: int) -> Tensor:
    shape = uniform_shape(x.shape, m, dim)
    return _like(x, mvue_math(x, uniform(u, shape, x.device) if _seeded(u) else u, n, m, dim))


@torch.library.custom_op("nm::mvue", mutates_args=())
def mvue(x: Tensor, u: Tensor, n: int, m: int, dim: int) -> Tensor:
    """MVUE N:M pruning of ``x`` along ``dim``; ``u``: per-group uniforms (``uniform_shape``) or an
    int64 seed (shape ``()``) standing for ``uniform(seed, uniform_shape)``."""
    _check_uniforms(x, u, uniform_shape(x.shape, m, dim), "mvue", ())
    return _mvue_torch(x, u, n, m, dim)


@mvue.register_kernel("cpu")
def _(x, u, n, m, dim):
    _check_uniforms(x, u, uniform_shape(x.shape, m, dim), "mvue", ())
    return cpu.mvue(x, u, n, m, dim) if _on_cpu_kernels(x, m) else _mvue_torch(x, u, n, m, dim)


@mvue.register_kernel("cuda")
def _(x, u, n, m, dim):
    _check_uniforms(x, u, uniform_shape(x.shape, m, dim), "mvue", ())
    return _triton(x, lambda: cuda.prune(x, u, n, m, dim, mvue=True), lambda: _mvue_torch(x, u, n, m, dim), "mvue", m)


@mvue.register_fake
def _(x, u, n, m, dim):
    return torch.empty_like(x)


@torch.library.custom_op("nm::greedy", mutates_args=())
def greedy(x: Tensor, n: int, m: int, dim: int) -> Tensor:
    """Greedy N:M pruning (keep the N largest magnitudes, biased) of ``x`` along ``dim``."""
    return _like(x, greedy_math(x, n, m, dim))


@greedy.register_kernel("cpu")
def _(x, n, m, dim):
    return cpu.greedy(x, n, m, dim) if _on_cpu_kernels(x, m) else _like(x, greedy_math(x, n, m, dim))


@greedy.register_kernel("cuda")
def _(x, n, m, dim):
    return _triton(x, lambda: cuda.prune(x, None, n, m, dim, mvue=False), lambda: _like(x, greedy_math(x, n, m, dim)),
                   "greedy", m)


@greedy.register_fake
def _(x, n, m, dim):
    return torch.empty_like(x)


def _samples(x: Tensor, u: Tensor) -> int:
    return u.shape[0] if (u.dim() == x.dim() + 1 or _seeded(u)) and u.dim() > 0 else 1


def _check_samples(x: Tensor, u: Tensor, op: str) -> None:
    samples = _samples(x, u)
    _check_uniforms(x, u, luq_noise_shape(x.shape, samples), op, (samples,))


def _stochastic_torch(spec: OpSpec, x: Tensor, u: Tensor, params: dict) -> Tensor:
    if _seeded(u):
        u = torch.stack([uniform(seed, x.shape, x.device) for seed in u])
    return _like(x, spec.math(x, u, **params))


def _define_stochastic(spec: OpSpec) -> None:
    """Register ``nm::<name>`` for an elementwise stochastic quantizer from its description: the
    portable math (``spec.math``), the CPU kernel ``nm_<name>`` and the Triton kernel
    ``cuda.<name>``, each taking ``spec.kernel_arg(params)``. ``u``: per-element uniforms
    ``(samples, *x.shape)`` or int64 seeds ``(samples,)``, sample s standing for
    ``uniform(u[s], x.shape)``; the output is the mean of the samples."""
    names = spec.args[1:]  # after u

    def params(args) -> dict:
        given = dict(zip(names, args))
        if spec.bits is not None and given.get("bits") not in spec.bits:
            raise ValueError(f"nm.{spec.name}: bits={given.get('bits')!r} is not allowed; use an integer in "
                             f"{min(spec.bits)}..{max(spec.bits)}")
        return given

    def portable(x, u, *args):
        _check_samples(x, u, spec.name)
        return _stochastic_torch(spec, x, u, params(args))

    def on_cpu(x, u, *args):
        _check_samples(x, u, spec.name)
        given = params(args)
        if not _on_cpu_kernels(x):
            return _stochastic_torch(spec, x, u, given)
        return cpu.stochastic(spec.name, x, u, spec.kernel_arg(given), dim=_dim(x, given, spec))

    def on_cuda(x, u, *args):
        _check_samples(x, u, spec.name)
        given = params(args)
        if not _triton_scales(x, given, spec):
            return _stochastic_torch(spec, x, u, given)
        kernel = getattr(cuda, spec.name)
        return _triton(x, lambda: kernel(x, u, spec.kernel_arg(given)),
                       lambda: _stochastic_torch(spec, x, u, given), spec.name)

    op = torch.library.custom_op(f"nm::{spec.name}", portable, mutates_args=(), schema=spec.schema)
    op.register_kernel("cpu")(on_cpu)
    op.register_kernel("cuda")(on_cuda)
    op.register_fake(lambda x, u, *args: torch.empty_like(x))
    if spec.int8_op is not None:
        _define_int8(spec, params)


def _int8_params(spec: OpSpec, x: Tensor, u: Tensor, given: dict) -> dict:
    """The op's parameters, after checking that its output has int8 codes (one sample, codes <= 127)."""
    full = {**given, "samples": _samples(x, u)}
    form = spec.form(full)
    if not form.int8:
        raise ValueError(f"nm.{spec.int8_op}: {form.int8_why}")
    return given


def _check_times(x: Tensor, times: Tensor, op: str) -> None:
    if times.dtype != torch.float32 or times.device != x.device:
        raise ValueError(f"nm.{op}: times must be a float32 tensor on {x.device}, got {times.dtype} on {times.device}")
    try:
        fits = torch.broadcast_shapes(times.shape, x.shape) == x.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"nm.{op}: times of shape {tuple(times.shape)} does not broadcast to x's shape "
                         f"{tuple(x.shape)} (use one factor per element, or size 1 along the dims it is constant on)")


def _times(x: Tensor, times: Tensor) -> Tensor:
    """x.float() * times in x's layout (the fake kernels' promise)."""
    return torch.empty_like(x, dtype=torch.float32).copy_(x).mul_(times)


def _define_int8(spec: OpSpec, params) -> None:
    """``nm::<spec.int8_op>``: the same quantizer writing int8 codes and their fp32 scale (codes·scale
    is bit for bit what ``nm::<name>`` returns): one pass on CPU, no values in between. It also takes
    ``times``, an fp32 multiplier broadcast to x: the codes are then those of x.float() * times, the
    product formed inside the CPU kernel (the lowering folds a forward operand's per-row scales into
    the gradient so: passes/lowering.py)."""
    own = len(spec.args) - 1  # the op's arguments after u; times follows them

    def split(x, args) -> tuple:
        """(the op's own arguments, times or None), ``times`` checked against x."""
        times = args[own] if len(args) > own else None
        if times is not None:
            _check_times(x, times, spec.int8_op)
        return args[:own], times

    def portable(x, u, *args):
        _check_samples(x, u, spec.int8_op)
        args, times = split(x, args)
        if times is not None:
            x = _times(x, times)
        given = _int8_params(spec, x, u, params(args))
        scale = spec.scale(x, **given)
        return int8_codes(_stochastic_torch(spec, x, u, given), scale), scale

    def on_cpu(x, u, *args):
        _check_samples(x, u, spec.int8_op)
        own_args, times = split(x, args)
        given = _int8_params(spec, x, u, params(own_args))
        if not _on_cpu_kernels(x):
            return portable(x, u, *args)
        return cpu.stochastic(spec.name, x, u, spec.kernel_arg(given), codes=True, dim=_dim(x, given, spec),
                              times=times)

    def on_cuda(x, u, *args):
        _check_samples(x, u, spec.int8_op)
        args, times = split(x, args)
        if times is not None:  # the Triton kernels take no multiplier: the product first
            x = _times(x, times)
        given = _int8_params(spec, x, u, params(args))
        if not _triton_scales(x, given, spec):
            return portable(x, u, *args)
        return _triton(x, lambda: getattr(cuda, spec.name)(x, u, spec.kernel_arg(given), codes=torch.int8),
                       lambda: portable(x, u, *args), spec.int8_op)

    schema = spec.schema.replace(") -> Tensor", ", Tensor? times=None) -> (Tensor, Tensor)")
    op = torch.library.custom_op(f"nm::{spec.int8_op}", portable, mutates_args=(), schema=schema)
    op.register_kernel("cpu")(on_cpu)
    op.register_kernel("cuda")(on_cuda)
    op.register_fake(lambda x, u, *args: _codes_fake(x, torch.int8, _dim(x, params(args[:own]), spec)))


for _spec in ops_of(kind=Kind.QUANTIZE, stage=Stage.GRADIENT):
    _define_stochastic(_spec)


def _sawb_torch(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    q, scale = sawb_math(x, bits)
    return _like(x, q), scale


def _sawb_cpu(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    if _on_cpu_kernels(x):
        return cpu.sawb(x, bits, *SAWB_COEFFICIENTS[bits], scale_bits(x.dtype, bits))
    return _sawb_torch(x, bits)


@torch.library.custom_op("nm::sawb", mutates_args=())
def sawb(x: Tensor, bits: int) -> Tensor:
    """SAWB round-to-nearest quantization of ``x`` (straight-through gradient)."""
    return _sawb_torch(x, bits)[0]


@sawb.register_kernel("cpu")
def _(x, bits):
    return _sawb_cpu(x, bits)[0]


@sawb.register_kernel("cuda")
def _(x, bits):
    return _triton(x, lambda: cuda.sawb(x, bits)[0], lambda: _sawb_torch(x, bits)[0], "sawb")


@sawb.register_fake
def _(x, bits):
    return torch.empty_like(x)


# -- float8 forms for lowering="native": the same quantizers, their output as exact codes and a
# -- per-tensor scale (kernels/fp8.py); codes·scale is bit for bit what nm.luq / nm.sawb return.


def _dim(x: Tensor, params: dict, spec: OpSpec) -> Optional[int]:
    """The op's scale dim (0..x.dim()-1), None for one scale per tensor."""
    return check_dim(x, params.get("dim"), spec.name)


def _triton_scales(x: Tensor, params: dict, spec: OpSpec) -> bool:
    """Whether the Triton kernels compute this op's scale: they take one per tensor, not a power of two."""
    return _dim(x, params, spec) is None and not params.get("pow2")


def _codes_fake(x: Tensor, fmt: torch.dtype, dim: Optional[int] = None) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x, dtype=fmt), x.new_empty(scale_shape(x.shape, dim), dtype=torch.float32)


@torch.library.custom_op("nm::sawb_fp8", mutates_args=())
def sawb_fp8(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """``nm.sawb(x, bits)`` as float8 e4m3fn codes (x's layout) and its fp32 scale."""
    return sawb_codes(*_sawb_torch(x, bits))


@sawb_fp8.register_kernel("cpu")
def _(x, bits):
    return sawb_codes(*_sawb_cpu(x, bits))


@sawb_fp8.register_kernel("cuda")
def _(x, bits):
    return _triton(x, lambda: cuda.sawb(x, bits, codes=torch.float8_e4m3fn), lambda: sawb_codes(*_sawb_torch(x, bits)),
                   "sawb_fp8")


@sawb_fp8.register_fake
def _(x, bits):
    return _codes_fake(x, torch.float8_e4m3fn)


def _luq_top(x: Tensor, u: Tensor, bits: int, levels: str, dim: Optional[int] = None) -> int:
    form = LUQ.form({"bits": bits, "levels": levels, "samples": _samples(x, u), "dim": dim})
    if form.float8 is None:
        raise ValueError(f"nm.luq_fp8: {form.why}")
    return luq_levels(bits, levels) - 1


@torch.library.custom_op("nm::luq_fp8", mutates_args=(), schema=LUQ.schema.replace("-> Tensor", "-> (Tensor, Tensor)"))
def luq_fp8(x: Tensor, u: Tensor, bits: int, levels: str, dim: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """``nm.luq(x, u, bits, levels)`` (one sample, one scale per tensor) as float8 codes (e4m3fn up to 5
    bits, e5m2 for 6; x's layout) and its fp32 scale."""
    return luq_codes(torch.ops.nm.luq.default(x, u, bits, levels), _luq_top(x, u, bits, levels, dim))


@luq_fp8.register_kernel("cuda")
def _(x, u, bits, levels, dim=None):
    top = _luq_top(x, u, bits, levels, dim)
    return _triton(x, lambda: cuda.luq(x, u, top, codes=luq_format(top, 1)[0]),
                   lambda: luq_codes(_stochastic_torch(LUQ, x, u, {"bits": bits, "levels": levels}), top),
                   "luq_fp8")


@luq_fp8.register_fake
def _(x, u, bits, levels, dim=None):
    return _codes_fake(x, luq_format(_luq_top(x, u, bits, levels, dim), 1)[0])


def _nonzero_scale(codes: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    return codes, torch.where(scale == 0, 1.0, scale)  # an all-zero tensor: codes 0, any scale


def _sawb_int8_torch(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    q, scale = _sawb_torch(x, bits)
    return _nonzero_scale(int8_codes(q, scale), scale)  # int8_codes: codes 0 where the scale is 0


@torch.library.custom_op("nm::sawb_int8", mutates_args=())
def sawb_int8(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """``nm.sawb(x, bits)`` as int8 codes (x's layout) and its fp32 scale."""
    return _sawb_int8_torch(x, bits)


@sawb_int8.register_kernel("cpu")
def _(x, bits):
    if _on_cpu_kernels(x):
        return _nonzero_scale(*cpu.sawb(x, bits, *SAWB_COEFFICIENTS[bits], scale_bits(x.dtype, bits), codes=True))
    return _sawb_int8_torch(x, bits)


@sawb_int8.register_kernel("cuda")
def _(x, bits):
    return _triton(x, lambda: cuda.sawb(x, bits, codes=torch.int8), lambda: _sawb_int8_torch(x, bits), "sawb_int8")


@sawb_int8.register_fake
def _(x, bits):
    return _codes_fake(x, torch.int8)


# -- absmax: round-to-nearest INT8 (or narrower) forward quantization (kernels/absmax.py)


def _absmax_torch(x: Tensor, bits: int, dim: Optional[int], pow2: bool) -> tuple[Tensor, Tensor]:
    q, scale = absmax_math(x, bits, dim, pow2)
    return _like(x, q), scale


@torch.library.custom_op("nm::absmax", mutates_args=(), schema=ABSMAX.schema)
def absmax(x: Tensor, bits: int, dim: Optional[int] = None, pow2: bool = False) -> Tensor:
    """Round-to-nearest ``bits``-bit quantization of ``x`` with an absmax scale per tensor, or per slice
    along ``dim``, with ``pow2`` a power of two (straight-through gradient)."""
    return _absmax_torch(x, bits, dim, pow2)[0]


@absmax.register_kernel("cpu")
def _(x, bits, dim=None, pow2=False):
    check_absmax_bits(bits)
    dim = check_dim(x, dim, "absmax")
    if _on_cpu_kernels(x):
        return cpu.absmax(x, kernel_bits(bits, pow2), dim=dim)
    return _absmax_torch(x, bits, dim, pow2)[0]


@absmax.register_fake
def _(x, bits, dim=None, pow2=False):
    return torch.empty_like(x)


def _absmax_int8_torch(x: Tensor, bits: int, dim: Optional[int], pow2: bool) -> tuple[Tensor, Tensor]:
    q, scale = _absmax_torch(x, bits, dim, pow2)
    return int8_codes(q, scale), scale


@torch.library.custom_op("nm::absmax_int8", mutates_args=(),
                         schema=ABSMAX.schema.replace("-> Tensor", "-> (Tensor, Tensor)"))
def absmax_int8(x: Tensor, bits: int, dim: Optional[int] = None, pow2: bool = False) -> tuple[Tensor, Tensor]:
    """``nm.absmax(x, bits, dim, pow2)`` as int8 codes (x's layout) and its fp32 scale(s)."""
    return _absmax_int8_torch(x, bits, dim, pow2)


@absmax_int8.register_kernel("cpu")
def _(x, bits, dim=None, pow2=False):
    check_absmax_bits(bits)
    dim = check_dim(x, dim, "absmax_int8")
    if _on_cpu_kernels(x):
        return cpu.absmax(x, kernel_bits(bits, pow2), codes=True, dim=dim)
    return _absmax_int8_torch(x, bits, dim, pow2)


@absmax_int8.register_fake
def _(x, bits, dim=None, pow2=False):
    return _codes_fake(x, torch.int8, check_dim(x, dim, "absmax_int8"))


@torch.library.custom_op("nm::seeds", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def seeds(count: int, device: torch.device) -> Tensor:
    """``count`` seeds from torch's generator, the values ``count`` separate ``draw_seed`` calls give.

    Opaque on purpose: Inductor turns every ``randint`` into a small kernel of its own (a compiler
    run each), while this is one buffer whose views the ops of a whole graph read."""
    return draw_seed(device, (count,))


@seeds.register_fake
def _(count, device):
    return torch.empty((count,), dtype=torch.int64, device=device)


def _sawb_backward(ctx, grad):
    return grad, None  # straight-through estimator


def _absmax_backward(ctx, grad):
    return grad, None, None, None  # straight-through estimator


sawb.register_autograd(_sawb_backward)
absmax.register_autograd(_absmax_backward)

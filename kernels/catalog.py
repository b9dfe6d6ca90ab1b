"""One description per nm op: everything the rest of nmcompile knows about it, as data.

An :class:`OpSpec` says what an op is (pruning or quantization, of the neural gradient or of the
forward operands), how its arguments are laid out, whether it is unbiased, which exact
low-precision form its output has (:class:`Form`), how reports, ONNX and Model Explorer show it,
and which option keys configure it. The option validation, the graph rewrite, the lowering, the
exporters, the noise monitor, the report and the CLI all read these descriptions instead of
naming ops themselves; adding a method is adding a description here (and its kernels).
``tests/nmcompile/test_catalog.py`` walks every op through every consumer.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Callable, Mapping, Optional, Sequence

import torch

from .fp8 import E4M3, luq_format
from .grouping import uniform_shape
from .int8 import INT8_MAX
from .luq import luq_levels, luq_math, luq_noise_shape, luq_scale
from .random import seeds_for
from .sawb import SAWB_COEFFICIENTS
from .sr import BITS, kernel_bits, sr_levels, sr_math, sr_scale_of

class Kind(str, enum.Enum):
    """What an op does to its input. A str: compares equal to, and is written in JSON as, its value."""

    PRUNE = "prune"
    QUANTIZE = "quantize"

    __str__ = str.__str__


class Stage(str, enum.Enum):
    """Which operands an op serves."""

    GRADIENT = "gradient"  # the neural gradient of a backward GEMM
    FORWARD = "forward"  # a forward GEMM's W and X

    __str__ = str.__str__


KINDS, STAGES = tuple(Kind), tuple(Stage)


def is_24(n: int, m: int) -> bool:
    """Whether N:M groups give a 2:4 structure (at most 2 nonzeros in every aligned 4), as the 2:4
    tensor-core GEMMs need: N <= 2 with 4 | M, or 1:2."""
    return (m % 4 == 0 and n <= 2) or (m == 2 and n == 1)


@dataclasses.dataclass(frozen=True)
class Form:
    """The exact low-precision form of an op's output, beyond its dtype.

    ``structure``: at most N nonzeros in every group of M along the op's dim. ``max_code``: the
    output is integer codes ``|c| <= max_code`` times a scale, exactly: one per tensor, or with
    ``rows`` one per slice along the op's ``dim`` (``kernels/scales.py``), exact in a GEMM whose K
    that dim is. ``float8``: a float8 format holding those codes exactly (None: ``why``). ``int8``:
    int8 codes times the fp32 scale(s) hold the output exactly (False: ``int8_why``). ``pow2``: every
    scale is a power of two, so an int8 GEMM of two such operands rescales its sums exactly in fp32."""

    structure: Optional[tuple[int, int]] = None
    max_code: Optional[int] = None
    float8: Optional[torch.dtype] = None
    why: str = ""
    int8: bool = False
    int8_why: str = ""
    rows: bool = False
    pow2: bool = False

    @property
    def sparse24(self) -> bool:
        return self.structure is not None and is_24(*self.structure)


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """What ``torch.ops.nm.<name>`` is. Fields are data; the few callables compute a value from
    the op's parameters (a dict of its argument names, plus ``samples`` for sampled ops)."""

    name: str
    kind: Kind  # a plain string is taken and checked ("prune" -> Kind.PRUNE)
    stage: Stage
    schema: str  # the op's signature; "u": uniforms or int64 seeds standing for them
    unbiased: bool
    options: Mapping[str, str]  # op parameter -> the backend option that sets it (n, m, dim: the pattern)
    bits: Optional[Sequence[int]]  # allowed bit widths (quantizers)
    summary: str  # one line for docs and --help
    label: Callable[[Mapping], str]  # the short label in reports and exports: "2:4", "luq4", "sawb4"
    form: Callable[[Mapping], Form]
    onnx_type: str  # op type in the com.nmcompile ONNX domain; attributes: ``onnx_attrs``
    onnx_attrs: tuple[str, ...]
    color: str  # node colour in Model Explorer and DOT
    codes_op: Optional[str] = None  # nm op giving the output as float8 codes and a scale, same arguments
    int8_op: Optional[str] = None  # nm op giving the output as int8 codes and a scale, same arguments
    # elementwise stochastic quantizers: the ops are registered from these (kernels/ops.py)
    math: Optional[Callable] = None  # portable torch math (x, uniforms (samples, *x.shape), **params)
    kernel_arg: Optional[Callable[[Mapping], int]] = None  # the int the CPU (nm_<name>) and Triton kernels take
    scale: Optional[Callable] = None  # (x, **params) -> the fp32 scale(s) of its int8 codes (one sample)
    row_scales: bool = False  # takes ``dim``: one scale per slice along it instead of one per tensor
    pow2_scales: bool = False  # takes ``pow2``: its scales rounded up to powers of two

    def __post_init__(self) -> None:
        for field, kind in (("kind", Kind), ("stage", Stage)):
            try:
                object.__setattr__(self, field, kind(getattr(self, field)))
            except ValueError:
                allowed = ", ".join(repr(k.value) for k in kind)
                raise ValueError(f"OpSpec {self.name!r}: {field}={getattr(self, field)!r} is not one of {allowed}") \
                    from None

    @property
    def op(self) -> torch._ops.OpOverload:
        return getattr(torch.ops.nm, self.name).default

    @property
    def args(self) -> tuple[str, ...]:
        """The op's argument names after x, in order."""
        inside = self.schema[self.schema.index("(") + 1:self.schema.index(")")]
        return tuple(arg.split("=")[0].split()[-1] for arg in inside.split(",")[1:])

    @property
    def sampled(self) -> bool:
        """Takes uniforms (or seeds standing for them): a random op."""
        return "u" in self.args

    def transform_label(self, params: Mapping, where: str = "") -> str:
        """The label of one application in a GEMM record: "mvue 2:4 along K (tokens)", "luq4 smp2",
        "luq4/row hadamard16", "sawb4 W,X"."""
        if self.kind == Kind.PRUNE:
            return f"{self.name} {self.label(params)} along {where}"
        text = self.label(params) + (f" smp{params['samples']}" if params.get("samples", 1) > 1 else "")
        if params.get("hadamard"):  # rotated along K around the quantizer (kernels/hadamard.py)
            text += f" hadamard{params['hadamard']}"
        return f"{text} {where}" if where else text

    def params_of(self, args: tuple) -> dict:
        """The parameters of a call ``op(x, *rest)`` from its args (``samples`` from the seeds' shape)."""
        params = dict(zip(self.args, args[1:]))
        u = params.pop("u", None)
        if self.sampled and "samples" in self.options:
            params["samples"] = _samples(u)
        return params

    def apply(self, x: torch.Tensor, **params) -> torch.Tensor:
        """The op on ``x`` with fresh seeds from torch's generator (the functional API and the graph
        pass call this, so both draw alike)."""
        return self.op(x, *self.call_args(x, **params))

    def call_args(self, x: torch.Tensor, **params) -> tuple:
        """The arguments after ``x`` of one call with ``params``, fresh seeds drawn for a sampled op (its codes
        ops take the same)."""
        rest = []
        for name in self.args:
            if name == "u":
                noise, seeds = _noise(self, x, params)
                rest.append(seeds_for(noise, x.device, seeds))
            elif name == "dim" and self.row_scales:  # optional: None is one scale per tensor
                rest.append(params.get("dim"))
            elif name == "pow2" and self.pow2_scales:  # optional: False keeps the finer scales
                rest.append(params.get("pow2", False))
            else:
                rest.append(params[name])
        return tuple(rest)


def _samples(u) -> int:
    """Samples averaged: the leading dim of the seeds ``(samples,)`` or uniforms ``(samples, *x.shape)``."""
    return int(u.shape[0]) if u is not None and u.dim() > 0 else 1


def _noise(spec: OpSpec, x: torch.Tensor, params: Mapping) -> tuple[tuple, tuple]:
    """(shape of the uniforms, shape of the seeds standing for them) of one call."""
    if spec.kind == Kind.PRUNE:  # one uniform per group, one seed
        return uniform_shape(x.shape, params["m"], params["dim"]), ()
    samples = params.get("samples", 1)  # one uniform per element and sample, one seed per sample
    return luq_noise_shape(x.shape, samples), (samples,)


# -- the ops ------------------------------------------------------------------------------------
def _structure(p: Mapping) -> Form:
    return Form(structure=(p["n"], p["m"]), why="pruning keeps values in the input dtype")


def _int8(max_code: int, samples: int, name: str) -> tuple[bool, str]:
    """Whether one-sample codes up to ``max_code`` fit int8, and why not."""
    if samples > 1:
        return False, (f"the mean of smp={samples} samples is not exactly an int8 code times one scale "
                       "in every dtype")
    if max_code > INT8_MAX:
        return False, f"{name} codes reach {max_code}, above int8's {INT8_MAX}"
    return True, ""


def _rows(p: Mapping) -> str:
    """The label's marks of per-row and of power-of-two scales: "sr8/row", "sr8/row/pow2"."""
    return ("/row" if p.get("dim") is not None else "") + ("/pow2" if p.get("pow2") else "")


def _float8_rows(p: Mapping, fmt, why: str) -> tuple:
    """(format, why not): float8 codes go to GEMMs with one scale per operand (torch._scaled_mm per tensor)."""
    if p.get("dim") is None:
        return fmt, why
    return None, "per-row scales: the FP8 GEMMs here take one scale per tensor"


def _luq_form(p: Mapping) -> Form:
    top = luq_levels(p["bits"], p["levels"]) - 1
    samples = p.get("samples", 1)
    fmt, why = _float8_rows(p, *luq_format(top, samples))
    int8, int8_why = _int8(2**top, samples, f"luq{p['bits']} ({p['levels']} levels)")
    # levels α·2^k, k = 0..top: codes 2^k with scale α; the mean of s samples: codes Σ2^k, scale α/s
    return Form(max_code=samples * 2**top, float8=fmt, why=why, int8=int8, int8_why=int8_why,
                rows=p.get("dim") is not None)


def _sawb_form(p: Mapping) -> Form:
    fits = p["bits"] <= 4  # e4m3 holds the integers up to 16
    int8, int8_why = _int8(2 ** p["bits"] - 1, 1, f"sawb{p['bits']}")  # unsigned grid: 0..2^bits - 1
    return Form(max_code=2 ** p["bits"] - 1, float8=E4M3 if fits else None,
                why="" if fits else f"sawb{p['bits']} codes exceed the integers e4m3 holds exactly",
                int8=int8, int8_why=int8_why)


def _prune_label(p: Mapping) -> str:
    return f"{p['n']}:{p['m']}"


_PRUNE = dict(kind=Kind.PRUNE, stage=Stage.GRADIENT, options={}, bits=None, label=_prune_label, form=_structure,
              onnx_attrs=("n", "m", "dim"))

MVUE = OpSpec(
    "mvue", **_PRUNE, schema="(Tensor x, Tensor u, int n, int m, int dim) -> Tensor", unbiased=True,
    summary="minimum-variance unbiased N:M pruning (water-filling marginals, systematic sampling)",
    onnx_type="MVUE", color="#ffa94d",
)
GREEDY = OpSpec(
    "greedy", **_PRUNE, schema="(Tensor x, int n, int m, int dim) -> Tensor", unbiased=False,
    summary="keep the N largest magnitudes of every M (biased baseline)", onnx_type="Greedy", color="#ffd43b",
)
LUQ = OpSpec(
    "luq", kind=Kind.QUANTIZE, stage=Stage.GRADIENT,
    schema="(Tensor x, Tensor u, int bits, str levels, int? dim=None) -> Tensor",
    unbiased=True,
    options={"bits": "bits", "levels": "levels", "samples": "smp"}, bits=range(2, 9),
    summary="logarithmic unbiased quantization: stochastic underflow and log-domain stochastic rounding",
    label=lambda p: f"luq{p['bits']}" + _rows(p), form=_luq_form, row_scales=True, onnx_type="LUQ",
    onnx_attrs=("bits", "levels", "dim"),
    color="#b197fc", codes_op="luq_fp8", int8_op="luq_int8", math=luq_math,
    kernel_arg=lambda p: luq_levels(p["bits"], p["levels"]) - 1, scale=luq_scale,
)
SAWB = OpSpec(
    "sawb", kind=Kind.QUANTIZE, stage=Stage.FORWARD, schema="(Tensor x, int bits) -> Tensor", unbiased=False,
    options={"bits": "fwd_bits"}, bits=tuple(sorted(SAWB_COEFFICIENTS)),
    summary="SAWB round-to-nearest quantization of weights and activations (straight-through gradient)",
    label=lambda p: f"sawb{p['bits']}", form=_sawb_form, onnx_type="SAWB", onnx_attrs=("bits",),
    color="#74c0fc", codes_op="sawb_fp8", int8_op="sawb_int8",
)


def _sr_form(p: Mapping) -> Form:
    samples = p.get("samples", 1)
    levels = sr_levels(p["bits"])
    fits = samples == 1 and levels <= 16  # e4m3 holds the integers up to 16
    int8, int8_why = _int8(levels, samples, f"sr{p['bits']}")
    what = "the mean of several samples" if samples > 1 else f"sr{p['bits']} codes"
    fmt, why = _float8_rows(p, E4M3 if fits else None,
                            "" if fits else what + " exceeds the integers e4m3 holds exactly")
    # codes |c| <= L, scale rounded so that c·scale is exact; the mean of s samples: codes Σc, scale/s
    return Form(max_code=samples * levels, float8=fmt, why=why, int8=int8, int8_why=int8_why,
                rows=p.get("dim") is not None, pow2=bool(p.get("pow2")))


SR = OpSpec(
    "sr", kind=Kind.QUANTIZE, stage=Stage.GRADIENT,
    schema="(Tensor x, Tensor u, int bits, int? dim=None, bool pow2=False) -> Tensor", unbiased=True,
    options={"bits": "bits", "samples": "smp", "pow2": "pow2_scales"}, bits=range(2, 9),
    summary="uniform stochastic rounding to 2^(bits-1)-1 magnitudes, absmax scale per tensor or per row",
    label=lambda p: f"sr{p['bits']}" + _rows(p), form=_sr_form, row_scales=True, pow2_scales=True, onnx_type="SR",
    onnx_attrs=("bits", "dim", "pow2"), color="#63e6be",
    int8_op="sr_int8", math=sr_math, kernel_arg=lambda p: kernel_bits(p["bits"], p.get("pow2", False)),
    scale=sr_scale_of,
)


def _absmax_form(p: Mapping) -> Form:
    return Form(max_code=sr_levels(p["bits"]), why="absmax codes go to int8 GEMMs (no float8 codes op)", int8=True,
                rows=p.get("dim") is not None, pow2=bool(p.get("pow2")))


ABSMAX = OpSpec(
    "absmax", kind=Kind.QUANTIZE, stage=Stage.FORWARD,
    schema="(Tensor x, int bits, int? dim=None, bool pow2=False) -> Tensor",
    unbiased=False, options={"bits": "fwd_bits", "pow2": "pow2_scales"}, bits=BITS,
    summary="round-to-nearest onto 2^(bits-1)-1 magnitudes, absmax scale per tensor or per row: the INT8 "
            "forward (straight-through gradient)",
    label=lambda p: f"absmax{p['bits']}" + _rows(p), form=_absmax_form, row_scales=True, pow2_scales=True,
    onnx_type="AbsMax", onnx_attrs=("bits", "dim", "pow2"),
    color="#4dabf7", int8_op="absmax_int8",
)

OPS: dict[str, OpSpec] = {spec.name: spec for spec in (MVUE, GREEDY, LUQ, SR, SAWB, ABSMAX)}
SEEDS_COLOR = "#dee2e6"  # the seed draws and other helper nodes the pass inserts


def register(spec: OpSpec) -> OpSpec:
    """Add ``spec`` to the catalog; its op ``torch.ops.nm.<name>`` (and its codes ops) must be defined first.
    Every consumer reads ``OPS`` when it runs, not when it is imported, so the op is then an option value, is
    rewritten, lowered, recorded, exported and measured like the built-in ones."""
    if spec.name in OPS:
        raise ValueError(f"an op named {spec.name!r} is already in the catalog")
    for name in (spec.name, spec.codes_op, spec.int8_op):
        if name is not None and not hasattr(torch.ops.nm, name):
            raise ValueError(f"define torch.ops.nm.{name} (torch.library.custom_op) before registering {spec.name!r}")
    OPS[spec.name] = spec
    return spec


def ops_of(kind: Optional[str] = None, stage: Optional[str] = None) -> tuple[OpSpec, ...]:
    return tuple(s for s in OPS.values() if (kind is None or s.kind == kind) and (stage is None or s.stage == stage))


def spec_of(target) -> Optional[OpSpec]:
    """The description of an FX node target (``torch.ops.nm.<name>.default``), None for other targets."""
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "nm":
        return None
    spec = OPS.get(target._opname)
    return spec if spec is not None and target is spec.op else None


def density(spec: OpSpec, params: Mapping) -> Optional[float]:
    """Fraction of values a pruning op keeps (None for other ops)."""
    return params["n"] / params["m"] if spec.kind == Kind.PRUNE else None

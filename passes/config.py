"""NMConfig: the backend options, parsed and validated once, early and loudly.

The methods an option may name are the ops of ``kernels.catalog``: ``method`` a pruning op,
``quant`` a gradient quantizer, ``fwd_quant`` a forward quantizer, each with its bit widths."""
from __future__ import annotations

import dataclasses
import enum
import re
from typing import Any, Optional

from nmcompile.kernels.catalog import OPS, Kind, OpSpec, Stage, ops_of
from nmcompile.kernels.gemm import Lowering
from nmcompile.kernels.hadamard import BLOCKS as HADAMARD_BLOCKS
from nmcompile.kernels.luq import Levels
from nmcompile.kernels.scales import GRANULARITIES
from .roles import BACKWARD_ROLES, Role

GEMM_ROLES = BACKWARD_ROLES


def _names(kind: Kind, stage: Stage) -> tuple[str, ...]:
    """The ops an option may name, read from the catalog as a config is made (an op registered later counts)."""
    return tuple(s.name for s in ops_of(kind=kind, stage=stage))


class Inner(str, enum.Enum):
    """The compiler the rewritten graphs go to."""

    INDUCTOR = "inductor"
    AOT_EAGER = "aot_eager"

    __str__ = str.__str__


LUQ_BITS = OPS["luq"].bits  # 1 sign bit + 1..7 exponent bits
_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern: Any, key: str = "sparsity") -> tuple[int, int]:
    """``"N:M"`` with 0 < N < M -> (N, M); anything else raises a ValueError naming it."""
    match = _PATTERN.match(pattern) if isinstance(pattern, str) else None
    if match:
        n, m = int(match.group(1)), int(match.group(2))
        if 0 < n < m:
            return n, m
    raise ValueError(
        f"{key}={pattern!r} is not a valid N:M pattern; use a string 'N:M' with 0 < N < M, e.g. '1:2', '2:4', '2:8'"
    )


def _plain(value: Any) -> Any:
    """An enum member's value (what options, JSON and graph arguments hold); anything else as it is."""
    return value.value if isinstance(value, enum.Enum) else value


def _choice(key: str, value: Any, allowed: tuple) -> Any:
    if value not in allowed:
        shown = ", ".join(repr(_plain(a)) for a in allowed)
        raise ValueError(f"{key}={_plain(value)!r} is not allowed; choose one of {shown}")
    return value


def _member(key: str, value: Any, vocabulary: type) -> enum.Enum:
    """``value`` as a member of the str enum ``vocabulary``, or the ValueError of ``_choice``."""
    return vocabulary(_choice(key, value, tuple(vocabulary)))


def _int_in(key: str, value: Any, allowed) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        shown = f"{allowed.start}..{allowed.stop - 1}" if isinstance(allowed, range) else ", ".join(map(str, allowed))
        raise ValueError(f"{key}={value!r} is not allowed; use an integer in {shown}")
    return value


def _scales(key: str, value: Any, quant_key: str, quant: Optional[str]) -> None:
    """``scales`` / ``fwd_scales``: one of GRANULARITIES, and "row" only for a quantizer that has per-row scales."""
    _choice(key, value, GRANULARITIES)
    if value == "row":
        if quant is None:
            raise ValueError(f"{key}='row' chooses the scales of {quant_key}, which is not set")
        if not OPS[quant].row_scales:
            rows = ", ".join(repr(s.name) for s in OPS.values() if s.row_scales)
            raise ValueError(f"{key}='row' is not available for {quant_key}={quant!r} (one scale per tensor); "
                             f"per-row scales: {rows}")


def _flag(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{key}={value!r} must be True or False")


def _pow2(config: "NMConfig") -> None:
    """``pow2_scales``: only with quantizers whose scales can be powers of two."""
    if not config.pow2_scales:
        return
    allowed = ", ".join(repr(s.name) for s in OPS.values() if s.pow2_scales)
    named = [(key, getattr(config, key)) for key in ("quant", "fwd_quant") if getattr(config, key) is not None]
    if not named:
        raise ValueError(f"pow2_scales=True rounds the scales of quant / fwd_quant, and neither is set; quantizers "
                         f"with power-of-two scales: {allowed}")
    for key, name in named:
        if not OPS[name].pow2_scales:
            raise ValueError(f"pow2_scales=True is not available for {key}={name!r}; quantizers with power-of-two "
                             f"scales: {allowed}")


def _hadamard(config: "NMConfig") -> None:
    """``hadamard``: 0, or the block size of a random Hadamard rotation along K around the gradient quantizer."""
    if config.hadamard == 0:
        return
    _int_in("hadamard", config.hadamard, (0, *HADAMARD_BLOCKS))
    if config.quant is None:
        raise ValueError(f"hadamard={config.hadamard} rotates the gradient before quant quantizes it, and quant is not "
                         "set")
    if config.sparsity is not None:
        raise ValueError(f"hadamard={config.hadamard} would rotate a gradient that sparsity={config.sparsity!r} "
                         "pruned, undoing its N:M structure (MVUE's pruning depends on the magnitudes themselves)")
    if config.dense_if_faster:
        raise ValueError(f"hadamard={config.hadamard} keeps the backward GEMMs in the input dtype (their codes are "
                         "in the rotated basis), which dense_if_faster's weighing of int8 GEMMs does not model; "
                         "set dense_if_faster=False")


def _regex(key: str, value: Any) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{key}={value!r} must be a regular expression string or None")
    try:
        re.compile(value)
    except re.error as err:
        raise ValueError(f"{key}={value!r} is not a valid regular expression: {err}") from None
    return value


class Part(str, enum.Enum):
    """What an option shapes, so that code deriving one recipe from another reads it here (FNT keeps the forward,
    the end-to-end noise reference drops the backward) instead of listing keys by hand."""

    BACKWARD = "backward"  # only what the backward computes: gradient compression, saved_int8
    FORWARD = "forward"  # the forward quantizer
    BOTH = "both"  # both halves at once: scales rounded to powers of two, dense_if_faster's choice of layers
    SCOPE = "scope"  # which layers are rewritten
    COMPILE = "compile"  # how the graph is compiled and lowered, not its numbers

    __str__ = str.__str__  # the value in f-strings and str() on every Python version


def _option(default: Any, part: Part) -> Any:
    return dataclasses.field(default=default, metadata={"part": part})


@dataclasses.dataclass(frozen=True)
class NMConfig:
    """What the ``nm`` backend does to the joint graph. Field names are the option keys."""

    sparsity: Optional[str] = _option(None, Part.BACKWARD)
    method: str = _option("mvue", Part.BACKWARD)
    gemms: tuple = _option((Role.WGRAD,), Part.BACKWARD)
    quant: Optional[str] = _option(None, Part.BACKWARD)
    bits: int = _option(4, Part.BACKWARD)
    levels: Levels = _option(Levels.STRICT, Part.BACKWARD)
    smp: int = _option(1, Part.BACKWARD)
    scales: str = _option("tensor", Part.BACKWARD)
    fwd_quant: Optional[str] = _option(None, Part.FORWARD)
    fwd_bits: int = _option(4, Part.FORWARD)
    fwd_scales: str = _option("tensor", Part.FORWARD)
    fwd_act_gemms: bool = _option(True, Part.FORWARD)  # also forward GEMMs of two activations (attention's)
    pow2_scales: bool = _option(False, Part.BOTH)
    hadamard: int = _option(0, Part.BACKWARD)
    include: Optional[str] = _option(None, Part.SCOPE)
    exclude: Optional[str] = _option(None, Part.SCOPE)
    keep_first_last: bool = _option(True, Part.SCOPE)
    dense_if_faster: bool = _option(False, Part.BOTH)
    recompute: bool = _option(False, Part.COMPILE)
    saved_int8: bool = _option(False, Part.BACKWARD)
    inner: Inner = _option(Inner.INDUCTOR, Part.COMPILE)
    lowering: Lowering = _option(Lowering.AUTO, Part.COMPILE)

    def __post_init__(self) -> None:
        # parsed once: (N, M) or None, read through .pattern (not a field: as_dict and replace see the string)
        object.__setattr__(self, "_pattern", parse_pattern(self.sparsity) if self.sparsity is not None else None)
        _choice("method", self.method, _names(Kind.PRUNE, Stage.GRADIENT))
        gemms = (self.gemms,) if isinstance(self.gemms, str) else self.gemms
        if not isinstance(gemms, (list, tuple)) or not gemms:
            raise ValueError(f"gemms={self.gemms!r} must be a non-empty list drawn from {list(map(str, GEMM_ROLES))}")
        object.__setattr__(self, "gemms", tuple(dict.fromkeys(Role(_choice("gemms", r, GEMM_ROLES)) for r in gemms)))
        if self.quant is not None:
            _choice("quant", self.quant, _names(Kind.QUANTIZE, Stage.GRADIENT))
        _int_in("bits", self.bits, OPS[self.quant or "luq"].bits)  # unset: what the default quantizer allows
        object.__setattr__(self, "levels", _member("levels", self.levels, Levels))
        _int_in("smp", self.smp, range(1, 65))
        if self.fwd_quant is not None:
            _choice("fwd_quant", self.fwd_quant, _names(Kind.QUANTIZE, Stage.FORWARD))
        _int_in("fwd_bits", self.fwd_bits, OPS[self.fwd_quant or "sawb"].bits)
        _scales("scales", self.scales, "quant", self.quant)
        _scales("fwd_scales", self.fwd_scales, "fwd_quant", self.fwd_quant)
        for key in ("fwd_act_gemms", "pow2_scales", "keep_first_last", "dense_if_faster", "recompute", "saved_int8"):
            _flag(key, getattr(self, key))
        _pow2(self)
        _hadamard(self)
        _regex("include", self.include)
        _regex("exclude", self.exclude)
        if self.dense_if_faster:
            missing = [f"{key}={getattr(self, key)!r}" for key in ("quant", "fwd_quant")
                       if getattr(self, key) is None or OPS[getattr(self, key)].int8_op is None]
            if missing:
                raise ValueError(f"dense_if_faster=True weighs int8 GEMMs against dense ones, and needs int8 codes on "
                                 f"both sides (quant and fwd_quant with int8 codes, e.g. the 'int8' preset); got "
                                 f"{', '.join(missing)}")
        object.__setattr__(self, "inner", _member("inner", self.inner, Inner))
        object.__setattr__(self, "lowering", _member("lowering", self.lowering, Lowering))

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def keys_of(cls, *parts: Part) -> tuple[str, ...]:
        """The option keys that shape ``parts``, in field order."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["part"] in parts)

    @classmethod
    def from_options(cls, options: Optional[dict]) -> tuple["NMConfig", dict]:
        """Split ``options`` into an NMConfig and Inductor config patches.

        Keys that are neither nm options nor ``torch._inductor.config`` names raise a ValueError.
        """
        options = dict(options or {})
        ours = {k: options.pop(k) for k in list(options) if k in cls.keys()}
        if options:
            import torch._inductor.config as inductor_config

            unknown = [k for k in options if not hasattr(inductor_config, k)]
            if unknown:
                raise ValueError(
                    f"unknown option {unknown[0]!r}; nm options are {', '.join(cls.keys())} "
                    "(other keys must name torch._inductor.config settings)"
                )
        return cls(**ours), options

    @property
    def pattern(self) -> Optional[tuple[int, int]]:
        return self._pattern

    def params_for(self, spec: OpSpec) -> dict:
        """The parameters this config gives a quantizer (its ``options``: bits, levels, samples)."""
        return {param: _plain(getattr(self, key)) for param, key in spec.options.items()}

    @property
    def compresses_gradients(self) -> bool:
        """Some backward GEMM's gradient operand is pruned or quantized (what the noise monitor measures)."""
        return self.sparsity is not None or self.quant is not None

    @property
    def is_noop(self) -> bool:
        return not self.compresses_gradients and self.fwd_quant is None and not self.saved_int8

    def as_dict(self) -> dict:
        """The options as plain values (strings where the fields hold enums), as JSON and ``options=`` take them."""
        d = {key: _plain(value) for key, value in dataclasses.asdict(self).items()}
        d["gemms"] = [r.value for r in self.gemms]
        return d

    def options(self) -> dict:
        """The options that differ from the defaults: what to pass as ``options=`` for this config."""
        defaults = NMConfig().as_dict()
        return {key: value for key, value in self.as_dict().items() if value != defaults[key]}

    def describe(self) -> str:
        parts = []
        if self.sparsity:
            parts.append(f"{self.method} {self.sparsity} on {'+'.join(self.gemms)}")
        if self.quant:
            rows = {"dim": "K"} if self.scales == "row" else {}
            rotation = {"hadamard": self.hadamard} if self.hadamard else {}
            parts.append(OPS[self.quant].transform_label({**self.params_for(OPS[self.quant]), **rows, **rotation}))
        if self.fwd_quant:
            rows = {"dim": "K"} if self.fwd_scales == "row" else {}
            parts.append(OPS[self.fwd_quant].transform_label({**self.params_for(OPS[self.fwd_quant]), **rows},
                                                             "forward"))
        return ", ".join(parts) or "no transforms"

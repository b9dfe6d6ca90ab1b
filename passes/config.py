"""NMConfig: the backend options, parsed and validated once, early and loudly.

The methods an option may name are the ops of ``kernels.catalog``: ``method`` a pruning op,
``quant`` a gradient quantizer, ``fwd_quant`` a forward quantizer, each with its bit widths."""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Optional

from nmcompile.kernels.catalog import OPS, OpSpec, ops_of
from nmcompile.kernels.hadamard import BLOCKS as HADAMARD_BLOCKS
from nmcompile.kernels.luq import LEVEL_KINDS
from nmcompile.kernels.scales import GRANULARITIES
from .roles import BACKWARD_ROLES

METHODS = tuple(s.name for s in ops_of(kind="prune"))
GEMM_ROLES = BACKWARD_ROLES
QUANTS = tuple(s.name for s in ops_of(kind="quantize", stage="gradient"))
FWD_QUANTS = tuple(s.name for s in ops_of(kind="quantize", stage="forward"))
INNERS = ("inductor", "aot_eager")
LOWERINGS = ("auto", "emulate", "native")
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


def _choice(key: str, value: Any, allowed: tuple) -> Any:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")
    return value


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


@dataclasses.dataclass(frozen=True)
class NMConfig:
    """What the ``nm`` backend does to the joint graph. Field names are the option keys."""

    sparsity: Optional[str] = None
    method: str = "mvue"
    gemms: tuple = ("wgrad",)
    quant: Optional[str] = None
    bits: int = 4
    levels: str = "strict"
    smp: int = 1
    scales: str = "tensor"
    fwd_quant: Optional[str] = None
    fwd_bits: int = 4
    fwd_scales: str = "tensor"
    pow2_scales: bool = False
    hadamard: int = 0
    include: Optional[str] = None
    exclude: Optional[str] = None
    keep_first_last: bool = True
    dense_if_faster: bool = False
    recompute: bool = False
    saved_int8: bool = False
    inner: str = "inductor"
    lowering: str = "auto"

    def __post_init__(self) -> None:
        # parsed once: (N, M) or None, read through .pattern (not a field: as_dict and replace see the string)
        object.__setattr__(self, "_pattern", parse_pattern(self.sparsity) if self.sparsity is not None else None)
        _choice("method", self.method, METHODS)
        gemms = (self.gemms,) if isinstance(self.gemms, str) else self.gemms
        if not isinstance(gemms, (list, tuple)) or not gemms:
            raise ValueError(f"gemms={self.gemms!r} must be a non-empty list drawn from {list(GEMM_ROLES)}")
        for role in gemms:
            _choice("gemms", role, GEMM_ROLES)
        object.__setattr__(self, "gemms", tuple(dict.fromkeys(gemms)))
        if self.quant is not None:
            _choice("quant", self.quant, QUANTS)
        _int_in("bits", self.bits, OPS[self.quant or QUANTS[0]].bits)
        _choice("levels", self.levels, LEVEL_KINDS)
        _int_in("smp", self.smp, range(1, 65))
        if self.fwd_quant is not None:
            _choice("fwd_quant", self.fwd_quant, FWD_QUANTS)
        _int_in("fwd_bits", self.fwd_bits, OPS[self.fwd_quant or FWD_QUANTS[0]].bits)
        _scales("scales", self.scales, "quant", self.quant)
        _scales("fwd_scales", self.fwd_scales, "fwd_quant", self.fwd_quant)
        for key in ("pow2_scales", "keep_first_last", "dense_if_faster", "recompute", "saved_int8"):
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
        _choice("inner", self.inner, INNERS)
        _choice("lowering", self.lowering, LOWERINGS)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

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
        return {param: getattr(self, key) for param, key in spec.options.items()}

    @property
    def compresses_gradients(self) -> bool:
        """Some backward GEMM's gradient operand is pruned or quantized (what the noise monitor measures)."""
        return self.sparsity is not None or self.quant is not None

    @property
    def is_noop(self) -> bool:
        return not self.compresses_gradients and self.fwd_quant is None and not self.saved_int8

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["gemms"] = list(self.gemms)
        return d

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


# -- options without a dict: frameworks that hand torch.compile a backend name only ------------------
ENV_OPTIONS = "NMCOMPILE_OPTIONS"
PRESETS: dict[str, dict] = {  # names NMCOMPILE_OPTIONS may hold instead of JSON
    "2:4": {"sparsity": "2:4"},
    "luq4": {"quant": "luq"},
    "luq4+sawb4": {"quant": "luq", "fwd_quant": "sawb"},
    "luq4+absmax8": {"quant": "luq", "fwd_quant": "absmax", "fwd_bits": 8},
    # 8-bit unbiased gradient codes and 8-bit forward codes, each with one scale per row along its GEMM's K (the
    # forward's folded into the gradient where a backward GEMM contracts the dim they vary along): every Linear
    # GEMM on exact int8, for VNNI/AMX CPUs and sm80+ GPUs, where 4-bit codes would buy no GEMM time over 8-bit
    # ones (docs/results.md §6-§8); a layer whose int8 GEMMs would be slower on this CPU stays dense; the backward
    # recomputes the forward int8 GEMMs' fp32 outputs from their codes (exact: the same numbers, less memory)
    "int8": {"quant": "sr", "bits": 8, "scales": "row", "fwd_quant": "absmax", "fwd_bits": 8, "fwd_scales": "row",
             "dense_if_faster": True, "recompute": True},
    "2:4+luq4": {"sparsity": "2:4", "quant": "luq"},
}


def environment_options(environ: Optional[dict] = None) -> dict:
    """The options ``NMCOMPILE_OPTIONS`` holds: a JSON object, or a preset name (``PRESETS``); {} when
    unset. A value that is neither raises a ValueError naming the variable, the value and what is allowed
    (the keys and values themselves are checked where they are used, as any options are)."""
    text = (environ if environ is not None else os.environ).get(ENV_OPTIONS, "").strip()
    if not text:
        return {}
    if text in PRESETS:
        return dict(PRESETS[text])
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        presets = ", ".join(PRESETS)
        raise ValueError(f"{ENV_OPTIONS}={text!r} is neither a preset ({presets}) nor JSON ({err})") from None
    if not isinstance(options, dict):
        raise ValueError(f"{ENV_OPTIONS}={text!r} must be a JSON object of options or a preset ({', '.join(PRESETS)})")
    return options

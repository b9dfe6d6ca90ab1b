"""The recipes table: every named set of backend options, written once.

A recipe is a name, the ``NMConfig`` it stands for and one line saying what it is. The presets (the names
``NMCOMPILE_OPTIONS`` is documented to take), the demo's runs, every tool's runs and the docs' tables read
this table; a tool that runs a variant writes only what it changes (``{**recipe("int8").options,
"pow2_scales": True}``). A new recipe is one more row here.

Names are matched ignoring whitespace, so ``luq4+sawb4`` names ``luq4 + sawb4``; a recipe's ``aliases`` are
the older spellings that keep working. A name keeps meaning what it ran: the long runs saved under a name are
reused only while its options are the same (tools/long_run.py checks)."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping, Optional

from nmcompile.passes.config import NMConfig


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    config: NMConfig
    description: str
    preset: bool = False  # one of the few recommended names (README, docs/frameworks.md)
    aliases: tuple[str, ...] = ()

    @property
    def options(self) -> dict:
        """The backend options (those that differ from the defaults), a fresh dict each time."""
        return self.config.options()


def _recipe(name: str, description: str, *, preset: bool = False, aliases: tuple[str, ...] = (),
            **options) -> Recipe:
    return Recipe(name, NMConfig(**options), description, preset, aliases)


_INT8_ROW_SR8 = {"quant": "sr", "bits": 8, "scales": "row", "fwd_quant": "absmax", "fwd_bits": 8}

RECIPES: tuple[Recipe, ...] = (
    _recipe("dense", "no compression: what every recipe is compared with"),
    # -- N:M pruning of the gradient operand (MVUE: unbiased; greedy: the biased baseline) -----------------------
    _recipe("mvue 2:4", "MVUE 2:4 on the update (wgrad) GEMMs", preset=True, aliases=("2:4",), sparsity="2:4"),
    _recipe("mvue 1:2", "MVUE 1:2 on the update GEMMs", sparsity="1:2"),
    _recipe("greedy 2:4", "the 2 largest of every 4 kept (biased: the baseline MVUE is compared with)",
            sparsity="2:4", method="greedy"),
    _recipe("greedy 1:2", "the larger of every 2 kept (biased)", sparsity="1:2", method="greedy"),
    _recipe("mvue 2:4 wgrad+dgrad", "MVUE 2:4 on both backward GEMMs", sparsity="2:4", gemms=("wgrad", "dgrad")),
    _recipe("greedy 2:4 wgrad+dgrad", "greedy 2:4 on both backward GEMMs (its bias compounds through the layers)",
            sparsity="2:4", method="greedy", gemms=("wgrad", "dgrad")),
    # -- 4-bit gradients, and 4- or 8-bit forwards ----------------------------------------------------------------
    _recipe("luq4", "LUQ 4-bit logarithmic gradient codes", preset=True, quant="luq"),
    _recipe("luq4 smp2", "LUQ4 averaged over 2 samples (SMP)", quant="luq", smp=2),
    _recipe("sr4", "uniform stochastic rounding to 4 bits (the baseline LUQ is compared with)", quant="sr"),
    _recipe("luq4 + sawb4", "LUQ4 gradients, SAWB 4-bit forward", preset=True, quant="luq", fwd_quant="sawb"),
    _recipe("luq4 smp2 + sawb4", "the LUQ paper's recipe: LUQ4 with SMP 2, SAWB 4-bit forward", quant="luq", smp=2,
            fwd_quant="sawb"),
    _recipe("sr4 smp2 + sawb4", "the same with uniform stochastic rounding", quant="sr", smp=2, fwd_quant="sawb"),
    _recipe("luq4 + absmax8", "LUQ4 gradients, absmax 8-bit forward: every Linear GEMM on exact int8", preset=True,
            quant="luq", fwd_quant="absmax", fwd_bits=8),
    _recipe("mvue 2:4 + luq4", "MVUE 2:4, then LUQ4 on what is kept", preset=True, aliases=("2:4+luq4",),
            sparsity="2:4", quant="luq"),
    _recipe("mvue 2:4 wgrad+dgrad + luq4 + sawb4", "every backward GEMM 2:4 and LUQ4, SAWB 4-bit forward",
            sparsity="2:4", gemms=("wgrad", "dgrad"), quant="luq", fwd_quant="sawb"),
    # -- 8-bit: the int8 preset and the variants measured on the way to it (docs/results.md §6-§12) ---------------
    _recipe("int8", "SR8 gradients and absmax8 forward, per-row scales, every Linear GEMM on exact int8 where that "
            "is faster here, attention's q·kᵀ and p·v unquantized, fp32 GEMM outputs recomputed from their codes",
            preset=True, **_INT8_ROW_SR8, fwd_scales="row", fwd_act_gemms=False, dense_if_faster=True,
            recompute=True),
    _recipe("int8, row sr8", "SR8 gradients with per-row scales, absmax8 forward with one scale per tensor",
            **_INT8_ROW_SR8),
    _recipe("int8, tensor sr8", "SR8 gradients and absmax8 forward, one scale per tensor each",
            **{**_INT8_ROW_SR8, "scales": "tensor"}),
    _recipe("int8, row + row, folded", "the int8 preset with every layer on int8 and nothing recomputed (the same "
            "numbers)", **_INT8_ROW_SR8, fwd_scales="row", fwd_act_gemms=False),
    _recipe("int8, row + row, folded, pow2", "the same with power-of-two scales (the int8 GEMMs rescale in fp32)",
            **_INT8_ROW_SR8, fwd_scales="row", pow2_scales=True),
    _recipe("int8, row + row, folded, saved8", "the same with an 8-bit copy of each other activation the backward "
            "keeps", **_INT8_ROW_SR8, fwd_scales="row", saved_int8=True),
    _recipe("sr8", "SR8 gradients alone, one scale per tensor", quant="sr", bits=8),
    _recipe("sr8, row", "SR8 gradients alone, per-row scales (the int8 preset's gradient half)", quant="sr", bits=8,
            scales="row"),
    _recipe("absmax8", "absmax8 forward alone, one scale per tensor", fwd_quant="absmax", fwd_bits=8),
    _recipe("absmax8, row", "absmax8 forward alone, per-row scales (the int8 preset's forward half)",
            fwd_quant="absmax", fwd_bits=8, fwd_scales="row"),
    _recipe("luq4, row", "LUQ4 with per-row scales", quant="luq", scales="row"),
    _recipe("luq4, hadamard16", "LUQ4 after a random 16-point Hadamard rotation along K", quant="luq", hadamard=16),
    _recipe("luq4, row, hadamard16", "both", quant="luq", scales="row", hadamard=16),
    _recipe("luq4 + absmax8, row", "luq4 + absmax8 with per-row gradient scales", quant="luq", fwd_quant="absmax",
            fwd_bits=8, scales="row"),
)


def _key(name: str) -> str:
    return "".join(name.split())


_BY_KEY: dict[str, Recipe] = {}
for _r in RECIPES:
    for _name in (_r.name, *_r.aliases):
        if _key(_name) in _BY_KEY:
            raise AssertionError(f"recipe name {_name!r} is taken twice")  # a table error, caught on import
        _BY_KEY[_key(_name)] = _r

PRESETS: Mapping[str, dict] = {r.name: r.options for r in RECIPES if r.preset}
ENV_OPTIONS = "NMCOMPILE_OPTIONS"


def find(name: str) -> Optional[Recipe]:
    """The recipe ``name`` names (ignoring whitespace; aliases too), or None."""
    return _BY_KEY.get(_key(name)) if isinstance(name, str) else None


def recipe(name: str) -> Recipe:
    """The recipe ``name`` names; a KeyError naming the recipes otherwise."""
    found = find(name)
    if found is None:
        raise KeyError(f"no recipe {name!r}; recipes: {', '.join(r.name for r in RECIPES)}")
    return found


def options_of(names) -> list[tuple[str, dict]]:
    """(name, options) for each of ``names``, in order: the runs of a tool that runs recipes by name."""
    return [(name, recipe(name).options) for name in names]


def markdown_table(names) -> str:
    """The docs' table of ``names``: recipe, backend options (JSON), what it is."""
    rows = ["| recipe | backend options | what it is |", "|---|---|---|"]
    rows += [f"| {r.name} | `{json.dumps(r.options)}` | {r.description} |" for r in map(recipe, names)]
    return "\n".join(rows)


def options_from_text(text: str, source: str) -> dict:
    """The options a recipe's name or a JSON object in ``text`` gives; a ValueError starting with ``source``
    (where the text came from) when it is neither."""
    found = find(text)
    if found is not None:
        return found.options
    presets = ", ".join(PRESETS)
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source} is neither a recipe's name (presets: {presets}; nmcompile recipes lists every "
                         f"one) nor JSON ({err})") from None
    if not isinstance(options, dict):
        raise ValueError(f"{source} must be a JSON object of options or a recipe's name (presets: {presets}), got "
                         f"{type(options).__name__}")
    return options


def environment_options(environ: Optional[dict] = None) -> dict:
    """The options ``NMCOMPILE_OPTIONS`` holds: a JSON object, or a recipe's name (a preset, e.g. ``int8``, or any
    other row of the table); {} when unset. A value that is neither raises a ValueError naming the variable, the
    value and the presets (the keys and values themselves are checked where they are used, as any options are)."""
    text = (environ if environ is not None else os.environ).get(ENV_OPTIONS, "").strip()
    return options_from_text(text, f"{ENV_OPTIONS}={text!r}") if text else {}


def page() -> str:
    """docs/recipes.md: the presets, then every recipe (``nmcompile recipes --markdown > docs/recipes.md``)."""
    return "\n\n".join([
        "## Recipes",
        "Every named set of backend options, from `nmcompile.recipes` (this page is its output: "
        "`nmcompile recipes --markdown > docs/recipes.md`). Pass a recipe's options to "
        "`torch.compile(model, backend=\"nm\", options=nmcompile.recipes.recipe(\"int8\").options)`, or its name in "
        "`NMCOMPILE_OPTIONS` (spaces ignored). What each recipe measured is in results.md and BENCHMARKS.md.",
        "### Presets\n\n" + markdown_table(r.name for r in RECIPES if r.preset),
        "### Every recipe\n\n" + markdown_table(r.name for r in RECIPES),
    ]) + "\n"

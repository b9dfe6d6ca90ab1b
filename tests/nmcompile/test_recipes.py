"""The recipes table (nmcompile.recipes) and the option parts: one home for every named recipe, read by the
presets, the demo, the tools and the docs; FNT and the end-to-end reference derive their keys from the parts."""
import ast
import dataclasses
import pathlib

import pytest

from nmcompile import recipes
from nmcompile.demo.recipes import METHODS, NAMES
from nmcompile.end_to_end import exact_options
from nmcompile.fnt import fnt_options
from nmcompile.passes.config import NMConfig, Part

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("r", recipes.RECIPES, ids=lambda r: r.name)
def test_a_recipe_is_its_options(r):
    assert NMConfig(**r.options) == r.config  # what a user passes is what the table means
    assert r.options is not r.options  # a fresh dict: a caller's edit cannot change the table
    assert r.description and "\n" not in r.description
    assert recipes.recipe(r.name) is r and all(recipes.recipe(a) is r for a in r.aliases)


def test_names_match_ignoring_whitespace_and_old_spellings_still_work():
    assert recipes.find("luq4+sawb4") is recipes.recipe("luq4 + sawb4")
    assert recipes.find("  int8 ") is recipes.recipe("int8")
    assert recipes.recipe("2:4").name == "mvue 2:4" and recipes.recipe("2:4+luq4").name == "mvue 2:4 + luq4"
    assert recipes.find("luq5") is None and recipes.find(None) is None
    with pytest.raises(KeyError, match=r"no recipe 'luq5'; recipes: dense, mvue 2:4, "):
        recipes.recipe("luq5")


def test_the_presets_are_the_marked_rows():
    assert list(recipes.PRESETS) == [r.name for r in recipes.RECIPES if r.preset]
    assert recipes.PRESETS["int8"] == {"quant": "sr", "bits": 8, "scales": "row", "fwd_quant": "absmax",
                                       "fwd_bits": 8, "fwd_scales": "row", "fwd_act_gemms": False,
                                       "dense_if_faster": True, "recompute": True}
    assert recipes.PRESETS["luq4 + sawb4"] == {"quant": "luq", "fwd_quant": "sawb"}


def test_the_demo_runs_rows_of_the_table():
    assert [name for name, _ in METHODS] == list(NAMES)
    assert all(options == recipes.recipe(name).options for name, options in METHODS)


def test_the_docs_tables_are_the_tables_output():
    assert (ROOT / "docs" / "recipes.md").read_text() == recipes.page()  # nmcompile recipes --markdown
    assert recipes.markdown_table(NAMES) in (ROOT / "docs" / "demo.md").read_text()
    for doc in ("README.md", "docs/frameworks.md"):  # where NMCOMPILE_OPTIONS is documented, every preset is named
        text = " ".join((ROOT / doc).read_text().split())
        assert [name for name in recipes.PRESETS if f"`{name}`" not in text] == [], doc


def test_no_module_writes_a_recipe_out():
    """Outside the table, a dict that names a compression (sparsity, quant, fwd_quant) is a variant of a recipe
    (``{**recipe(...).options, ...}``), never a whole recipe written again."""
    found = []
    paths = [p for folder in ("nmcompile", "passes", "kernels", "tools") for p in (ROOT / folder).rglob("*.py")]
    for path in paths:
        if path == ROOT / "nmcompile" / "recipes.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Dict) and None not in node.keys:
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
                if keys & {"sparsity", "quant", "fwd_quant"}:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found


def test_every_option_says_what_it_shapes():
    parts = {f.name: f.metadata["part"] for f in dataclasses.fields(NMConfig)}
    assert set(parts.values()) <= set(Part)
    assert sum(len(NMConfig.keys_of(part)) for part in Part) == len(NMConfig.keys())  # each key in one part
    assert NMConfig.keys_of(Part.FORWARD) == ("fwd_quant", "fwd_bits", "fwd_scales", "fwd_act_gemms")
    assert {"sparsity", "quant", "saved_int8", "hadamard"} <= set(NMConfig.keys_of(Part.BACKWARD))
    assert f"{Part.BACKWARD}" == str(Part.BACKWARD) == "backward" == Part.BACKWARD  # a string where one is read


def test_fnt_and_the_exact_reference_derive_their_keys_from_the_parts():
    every = {"sparsity": "2:4", "method": "greedy", "gemms": ["wgrad", "dgrad"], "quant": "sr", "bits": 8,
             "levels": "reference", "smp": 2, "scales": "row", "fwd_quant": "absmax", "fwd_bits": 8,
             "fwd_scales": "row", "fwd_act_gemms": False, "pow2_scales": True, "hadamard": 0, "include": "blocks",
             "exclude": "head",
             "keep_first_last": False, "dense_if_faster": False, "recompute": True, "saved_int8": True,
             "inner": "aot_eager", "lowering": "emulate", "max_autotune": False}
    assert set(every) - {"max_autotune"} == set(NMConfig.keys())  # this test names every option
    kept = set(NMConfig.keys_of(Part.FORWARD, Part.SCOPE, Part.COMPILE))
    assert fnt_options(every) == {k: v for k, v in every.items() if k in kept}  # lowering too, since issue 32
    assert exact_options(every) == {k: v for k, v in every.items() if k not in NMConfig.keys_of(Part.BACKWARD)}


def test_the_cli_lists_the_recipes_and_takes_their_names(capsys):
    from nmcompile.cli import main
    from nmcompile.cli.targets import parse_options

    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("mvue 2:4") and "preset" in lines[0] and len(lines) == 2 * len(recipes.RECIPES)
    assert main(["recipes", "--markdown"]) == 0
    assert capsys.readouterr().out == recipes.page()
    options, config = parse_options("luq4+sawb4")
    assert options == recipes.PRESETS["luq4 + sawb4"] and config.fwd_quant == "sawb"

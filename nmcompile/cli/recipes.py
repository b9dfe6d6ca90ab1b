"""``nmcompile recipes``: the recipes table, presets first; ``--markdown`` prints docs/recipes.md."""
from __future__ import annotations

import json
import sys

from nmcompile.recipes import RECIPES, page


def run(args) -> int:
    if args.markdown:
        sys.stdout.write(page())
        return 0
    width = max(len(r.name) for r in RECIPES)
    for r in sorted(RECIPES, key=lambda r: not r.preset):  # stable: the table's order within each group
        mark = "preset" if r.preset else ""
        sys.stdout.write(f"{r.name:{width}}  {mark:6}  {json.dumps(r.options)}\n")
        sys.stdout.write(f"{'':{width}}  {'':6}  {r.description}\n")
    return 0

"""The demo's runs and presets.

``METHODS`` is what the demo runs: one ``(name, backend options)`` pair per recipe of ``nmcompile.recipes``
named in ``NAMES``. Every run differs from "dense" only by these options; a new run is one more name here
(a new recipe, one more row in nmcompile/recipes.py). Its name is what ``--methods`` takes."""
from __future__ import annotations

from nmcompile.recipes import options_of

NAMES = ("dense", "mvue 2:4", "mvue 1:2", "greedy 2:4", "mvue 2:4 wgrad+dgrad", "greedy 2:4 wgrad+dgrad",
         "luq4 smp2 + sawb4", "sr4 smp2 + sawb4", "luq4 + absmax8", "mvue 2:4 + luq4")
METHODS: list[tuple[str, dict]] = options_of(NAMES)

# the presets: --quick and the default run
QUICK = {"epochs": 2, "hidden": 64, "inner": "aot_eager", "seeds": [0]}
DEFAULT = {"epochs": 10, "hidden": 128, "inner": "inductor", "seeds": [0, 1, 2]}

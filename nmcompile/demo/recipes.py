"""The demo's recipes and presets.

``METHODS`` is the recipes table: one row per recipe, ``(name, backend options)``. Every run differs from
"dense" only by these options; a new recipe is one more row here (its name is what ``--methods`` takes)."""
from __future__ import annotations

# -- the recipes table -----------------------------------------------------------------------------
# (name, backend options): every run differs from "dense" only by these
METHODS: list[tuple[str, dict]] = [
    ("dense", {}),
    ("mvue 2:4", {"sparsity": "2:4"}),
    ("mvue 1:2", {"sparsity": "1:2"}),
    ("greedy 2:4", {"sparsity": "2:4", "method": "greedy"}),
    ("mvue 2:4 wgrad+dgrad", {"sparsity": "2:4", "gemms": ["wgrad", "dgrad"]}),
    ("greedy 2:4 wgrad+dgrad", {"sparsity": "2:4", "method": "greedy", "gemms": ["wgrad", "dgrad"]}),
    ("luq4 smp2 + sawb4", {"quant": "luq", "smp": 2, "fwd_quant": "sawb"}),
    ("sr4 smp2 + sawb4", {"quant": "sr", "smp": 2, "fwd_quant": "sawb"}),
    ("luq4 + absmax8", {"quant": "luq", "fwd_quant": "absmax", "fwd_bits": 8}),
    ("mvue 2:4 + luq4", {"sparsity": "2:4", "quant": "luq"}),
]
# -- end of the recipes table ----------------------------------------------------------------------

# the presets: --quick and the default run
QUICK = {"epochs": 2, "hidden": 64, "inner": "aot_eager", "seeds": [0]}
DEFAULT = {"epochs": 10, "hidden": 128, "inner": "inductor", "seeds": [0, 1, 2]}

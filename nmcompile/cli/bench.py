"""``nmcompile bench``: says where the benchmarks are (scripts in tools/) and exits with the usage status."""
from __future__ import annotations

import sys

from nmcompile.cli.errors import EXIT_USAGE


def run(args) -> int:
    sys.stderr.write(
        "nmcompile bench: the benchmarks are scripts in tools/ (results in BENCHMARKS.md); "
        "run them from a source checkout, e.g. python tools/<script>.py\n"
    )
    return EXIT_USAGE

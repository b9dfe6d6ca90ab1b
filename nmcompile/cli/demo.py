"""``nmcompile demo [...]``: the digits demo (``nmcompile.demo``), with everything after ``demo`` parsed by the
demo's own arguments."""
from __future__ import annotations

import argparse

from nmcompile.cli.errors import CLIError


def run(args) -> int:
    try:
        import nmcompile.demo as demo
    except ImportError as e:
        if getattr(e, "name", None) == "nmcompile.demo":
            raise CLIError("the demo is not available in this installation (nmcompile.demo is missing)") from None
        raise CLIError(f"the demo needs an optional dependency: {e} (pip install 'nmcompile[demo]')") from None
    parser = argparse.ArgumentParser(
        prog="nmcompile demo", description=(demo.__doc__ or "").strip().splitlines()[0] if demo.__doc__ else None
    )
    demo.add_arguments(parser)
    return int(demo.main(parser.parse_args(args.rest)) or 0)

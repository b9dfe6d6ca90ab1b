"""The ``nmcompile`` command line (also ``python -m nmcompile``).

    nmcompile inspect TARGET [--options JSON] [--graph joint|forward|backward|joint-before|none] [--json]
                             [--noise [--draws K]]
    nmcompile export  TARGET --format onnx|model-explorer|dot|json -o PATH [--graph ...] [--strip-stack-traces]
    nmcompile profile TARGET [--steps N] [-o trace.json] [--json]
    nmcompile view    FILE [--host HOST] [--port N] [--browser]   (Netron / Model Explorer, until Ctrl-C)
    nmcompile demo [...]                  (the digits demo, see ``nmcompile demo --help``)
    nmcompile recipes [--markdown]        (the named recipes: what --options and NMCOMPILE_OPTIONS may name)

TARGET is ``mlp``, ``cnn``, ``gpt`` (built-in examples) or ``FILE.py:FACTORY`` / ``package.module:FACTORY``
where ``FACTORY()`` returns ``(model, example_inputs)``. ``--options`` is the backend's options as a JSON
object or a recipe's name (default ``{"sparsity": "2:4"}``; what is given replaces the default). Machine output goes to
stdout, progress and diagnostics to stderr; ``NO_COLOR`` turns colour off. Errors are one line on stderr
and a non-zero exit (``--debug`` shows the traceback).

This package is the parser and the dispatch; each command is a module of it (``inspect``, ``export``,
``profile``, ``view``, ``demo``, ``recipes``, ``bench``) with ``run(args) -> exit status``; ``errors`` holds
``CLIError`` and the exit statuses, ``common`` what the commands share (the consoles, capturing a TARGET),
``targets`` loading a TARGET and parsing ``--options``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import traceback
from typing import Optional

from nmcompile.cli.errors import EXIT_ERROR, CLIError
from nmcompile.version import __version__

GRAPH_CHOICES = ("joint", "forward", "backward", "joint-before")


def _command(name: str):
    """The command ``name``: ``run(args)`` of module ``nmcompile.cli.<name>``, imported when it runs."""

    def run(args) -> int:
        return importlib.import_module(f"nmcompile.cli.{name}").run(args)

    run.__name__ = f"cmd_{name}"
    return run


# -- parser -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "target",
        metavar="TARGET",
        help="built-in example (mlp, cnn, gpt) or FILE.py:FACTORY / package.module:FACTORY, "
        "FACTORY() returning (model, example_inputs)",
    )
    common.add_argument(
        "--options",
        metavar="JSON",
        default=None,
        help='backend options as a JSON object (default: {"sparsity": "2:4"}); replaces the default',
    )
    common.add_argument("--debug", action="store_true", help="show the full traceback on errors")

    parser = argparse.ArgumentParser(
        prog="nmcompile",
        description="Inspect, export, profile and view what the nm torch.compile backend does to a model's "
        "training graphs.",
    )
    parser.add_argument("--version", action="version", version=f"nmcompile {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "inspect",
        parents=[common],
        help="table, module tree and rewritten graph of every GEMM",
        description="Compile TARGET with the nm backend, run one step, and show every GEMM.",
    )
    p.add_argument(
        "--graph",
        choices=GRAPH_CHOICES + ("none",),
        default="joint",
        help="graph to print as code: the joint graph after the rewrite (default), the partitioned "
        "forward/backward, the joint graph before the rewrite, or none",
    )
    p.add_argument("--json", action="store_true", help="print only the report JSON (schema nmcompile.report/6; "
                   "with --noise nmcompile.noise/1)")
    p.add_argument("--noise", action="store_true", help="measure, on the example inputs, the variance the gradient "
                   "compression adds to each rewritten backward GEMM, next to ‖G‖² and the minibatch noise")
    p.add_argument("--draws", type=int, default=2, help="independent draws per GEMM for --noise (default 2)")
    p.set_defaults(func=_command("inspect"))

    p = sub.add_parser(
        "export",
        parents=[common],
        help="write the rewritten graphs as ONNX / Model Explorer / DOT / JSON",
        description="Write the rewritten graphs. onnx: nm ops in domain com.nmcompile; model-explorer: a "
        "graph collection (joint before/after, forward, backward) plus PATH.density.json and "
        "PATH.bits.json node-data overlays; dot: Graphviz; json: the report.",
    )
    p.add_argument("--format", "-f", required=True, choices=("onnx", "model-explorer", "dot", "json"))
    p.add_argument("--output", "-o", required=True, metavar="PATH")
    p.add_argument(
        "--graph",
        choices=GRAPH_CHOICES,
        default="joint",
        help="graph for onnx/dot (default joint, after the rewrite); model-explorer writes all",
    )
    p.add_argument("--strip-stack-traces", action="store_true", help="leave source stack traces out of ONNX metadata")
    p.set_defaults(func=_command("export"))

    p = sub.add_parser(
        "profile",
        parents=[common],
        help="profile training steps; Chrome/Perfetto trace with nm events",
        description="Run N forward+backward steps of the compiled model under torch.profiler and write a "
        "Chrome/Perfetto trace whose nm events carry module, role and pattern args.",
    )
    p.add_argument("--steps", type=int, default=5, help="profiled steps after one warm-up step (default 5)")
    p.add_argument(
        "--output",
        "-o",
        default="nmcompile-trace.json",
        metavar="PATH",
        help="trace file (default nmcompile-trace.json)",
    )
    p.add_argument("--json", action="store_true", help="print the time summary as JSON (schema nmcompile.profile/1)")
    p.set_defaults(func=_command("profile"))

    p = sub.add_parser(
        "view",
        help="serve an exported file in Netron (.onnx) or Model Explorer (.json) until Ctrl-C",
        description="Serve FILE in the viewer made for it and print the page's URL: an ONNX file in Netron, a "
        "Model Explorer collection in Model Explorer with the density and bits overlays written beside it. "
        "Ctrl-C stops it. Needs pip install 'nmcompile[viewers]'.",
    )
    p.add_argument("file", metavar="FILE", help="a file written by nmcompile export --format onnx|model-explorer")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=0, help="port to listen on (default: any free port)")
    p.add_argument("--browser", action="store_true", help="also open the URL in the default web browser")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    p.set_defaults(func=_command("view"))

    p = sub.add_parser(
        "demo", help="train the digits MLP dense / MVUE / greedy / LUQ (nmcompile demo --help)", add_help=False
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_command("demo"), debug=False)

    p = sub.add_parser("recipes", help="list the named recipes (presets first), or print docs/recipes.md")
    p.add_argument("--markdown", action="store_true", help="the docs page: markdown tables of the presets and all")
    p.set_defaults(func=_command("recipes"), debug=False)

    p = sub.add_parser("bench", help="benchmarks live in tools/ (prints where)")
    p.set_defaults(func=_command("bench"), debug=False)
    return parser


@contextlib.contextmanager
def _torch_tracebacks_quiet():
    """Torch >= 2.14 logs a traceback at ERROR level when a model fails under fake tensors; the CLI's
    errors are one line unless --debug, so those loggers stay quiet meanwhile."""
    import logging

    loggers = [logging.getLogger("torch._subclasses.fake_tensor")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def main(argv: Optional[list] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["demo"]:  # everything after "demo" (--help included) belongs to the demo's parser
        args = argparse.Namespace(command="demo", rest=argv[1:], func=_command("demo"), debug=False)
    else:
        args = parser.parse_args(argv)
    debug = getattr(args, "debug", False) or (args.command == "demo" and "--debug" in args.rest)
    try:
        with contextlib.nullcontext() if debug else _torch_tracebacks_quiet():
            return int(args.func(args) or 0)
    except CLIError as e:
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"nmcompile: error: {e}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("nmcompile: interrupted\n")
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # never a traceback unless asked for
        if debug:
            traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0]
        sys.stderr.write(
            f"nmcompile: error: {type(e).__name__}: {first}"
            + ("" if debug else " (run with --debug for the traceback)")
            + "\n"
        )
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

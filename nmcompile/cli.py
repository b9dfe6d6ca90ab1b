"""The ``nmcompile`` command line (also ``python -m nmcompile``).

    nmcompile inspect TARGET [--options JSON] [--graph joint|forward|backward|joint-before|none] [--json]
                             [--noise [--draws K]]
    nmcompile export  TARGET --format onnx|model-explorer|dot|json -o PATH [--graph ...] [--strip-stack-traces]
    nmcompile profile TARGET [--steps N] [-o trace.json] [--json]
    nmcompile view    FILE [--host HOST] [--port N] [--browser]   (Netron / Model Explorer, until Ctrl-C)
    nmcompile demo [...]                  (the digits demo, see ``nmcompile demo --help``)

TARGET is ``mlp``, ``cnn``, ``gpt`` (built-in examples) or ``FILE.py:FACTORY`` / ``package.module:FACTORY``
where ``FACTORY()`` returns ``(model, example_inputs)``. ``--options`` is the backend's options as a JSON
object (default ``{"sparsity": "2:4"}``; a given object replaces the default). Machine output goes to
stdout, progress and diagnostics to stderr; ``NO_COLOR`` turns colour off. Errors are one line on stderr
and a non-zero exit (``--debug`` shows the traceback).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import re
import sys
import traceback
from typing import Optional

EXIT_ERROR = 1
EXIT_USAGE = 2

GRAPH_CHOICES = ("joint", "forward", "backward", "joint-before")


# -- output -------------------------------------------------------------------------------------
def _consoles():
    from rich.console import Console

    return Console(highlight=False), Console(stderr=True, highlight=False)


@contextlib.contextmanager
def _status(err_console, text: str):
    """A spinner on stderr when it is a terminal, a plain line otherwise."""
    if err_console.is_terminal:
        with err_console.status(text):
            yield
    else:
        err_console.print(text)
        yield


def graph_code(gm, annotate: bool = True) -> tuple[str, set]:
    """The graph's readable code; every line defining an inserted node is marked, and each nm op is
    preceded by a ``# <-- nm: <op> <pattern> <role> <module>`` line. Returns (code, 1-based marked lines)."""
    from nmcompile.export import is_inserted, nm_attrs
    from nmcompile.passes.records import NodeInfo

    inserted = {}
    for node in gm.graph.nodes:
        if is_inserted(node):
            info = nm_attrs(node)
            if info is not None:
                inserted[node.name] = f"nm: {info['op']} {info['pattern']} {info['role']} {info['module'] or '<top>'}"
            else:
                meta = NodeInfo.read(node)
                if meta is None or meta.op == "seeds" or meta.op.startswith(("mvue", "greedy", "luq")):
                    inserted[node.name] = f"nm: uniforms for {meta.gemm if meta else '?'}"
                else:  # lowering="native": float8 codes and the FP8 / 2:4 GEMMs
                    inserted[node.name] = f"nm: {meta.kernel or meta.op} {meta.role or 'fwd'} {meta.module or '<top>'}"
    code = gm.print_readable(print_output=False, include_stride=False, include_device=False)
    lines, marked = [], set()
    pattern = re.compile(r'^\s*(\w+)(?:\s*:\s*"[^"]*")?\s*=')
    for line in code.splitlines():
        m = pattern.match(line)
        if m and m.group(1) in inserted:
            if annotate and not inserted[m.group(1)].startswith("nm: uniforms"):
                indent = line[: len(line) - len(line.lstrip())]
                lines.append(f"{indent}# <-- {inserted[m.group(1)]}")
                marked.add(len(lines))
            marked.add(len(lines) + 1)
        lines.append(line)
    return "\n".join(lines), marked


def _holds_float8(gm) -> bool:
    import torch

    fp8 = (torch.float8_e4m3fn, torch.float8_e5m2)
    return any(isinstance(v, torch.Tensor) and v.dtype in fp8
               for node in gm.graph.nodes for v in torch.utils._pytree.tree_leaves(node.meta.get("val")))


# -- commands -----------------------------------------------------------------------------------
def _prepare(args, err):
    from nmcompile.targets import load_target, parse_options

    options = parse_options(args.options)
    with _status(err, f"loading {args.target} …"):
        model, inputs = load_target(args.target)
    return model, inputs, options


def _capture(args, err):
    from nmcompile.passes import NMConfig
    from nmcompile.targets import run_captured, trace_report

    model, inputs, options = _prepare(args, err)
    config, _ = NMConfig.from_options(options)
    if config.inner != "aot_eager":
        err.print(f"[dim]note: graphs captured with inner='aot_eager' so the nm ops stay visible; "
                  f"the rewrite is the same as with inner={config.inner!r}[/dim]")
    with _status(err, f"compiling {args.target} with options {json.dumps(options)} and running one step …"):
        run = run_captured(model, inputs, options)
    if trace_report(run.report):
        err.print("[dim]TORCH_TRACE: report logged as artifact 'nmcompile_report'[/dim]")
    return run


def _inspect_noise(args) -> int:
    from nmcompile.noise import NoiseMonitor
    from nmcompile.targets import CLIError

    out, err = _consoles()
    if args.draws < 2:
        raise CLIError(f"--draws must be at least 2 (the variance needs two independent draws), got {args.draws}")
    model, inputs, options = _prepare(args, err)
    with _status(err, f"measuring the gradient noise of {args.target} ({args.draws} draws per GEMM) …"):
        try:
            report = NoiseMonitor(model, options, draws=args.draws).measure(*inputs)
        except ValueError as e:
            raise CLIError(str(e)) from e
    if args.json:
        sys.stdout.write(report.to_json() + "\n")
        return 0
    out.print(report.table(f"{args.target}: gradient noise per rewritten backward GEMM, {json.dumps(options)}"))
    out.print("[dim]‖G‖²: the exact GEMM output; E‖Ĝ−G‖²: the compression's noise, variance (MVUE, LUQ) plus "
              "bias² (greedy), from independent draws; minibatch var: from the two halves of the batch (update "
              "GEMMs); stall ratio: (‖G‖² − minibatch var)/(3·E‖Ĝ−G‖²), below 1 training stalls (Chmiel et al. "
              "2025). One batch: noisy estimates, see docs/noise.md[/dim]")
    return 0


def cmd_inspect(args) -> int:
    if args.noise:
        return _inspect_noise(args)
    out, err = _consoles()
    run = _capture(args, err)
    report = run.report
    if args.json:
        sys.stdout.write(report.to_json() + "\n")
        return 0
    from rich.panel import Panel
    from rich.syntax import Syntax

    from nmcompile.passes import NMConfig
    from nmcompile.report import gemm_table, module_tree

    s = report.summary()
    config = NMConfig.from_options(run.options)[0]
    out.print(f"[bold]{args.target}[/bold]: {config.describe()} — {s['rewritten']} of {s['gemms']} GEMMs rewritten, "
              f"{s['skipped']} skipped; backward FLOPs with a sparse gradient {s['sparse_flop_share']:.0%}, "
              f"with a 4-bit gradient {s['luq_flop_share']:.0%}")
    out.print(gemm_table(report, f"GEMMs ({len(report.gemms)}), in {len(run.graphs)} graph(s)"))
    out.print("[dim]TC speedup: peak tensor-core math ratio vs dense bf16 on H100 (2:4 sparse ×2, both operands "
              "4-bit → FP8 ×2); an upper bound, see docs/cli.md[/dim]")
    out.print(module_tree(report, f"{args.target} by module"))
    if args.graph != "none":
        for entry in run.graphs:
            gm = entry.get(args.graph)
            if gm is None:
                continue
            code, marked = graph_code(gm)
            out.print(
                Panel(
                    Syntax(
                        code, "python", line_numbers=True, highlight_lines=marked, word_wrap=False, theme="ansi_dark"
                    ),
                    title=f"graph {entry.index}: {args.graph} (after the nm rewrite)"
                    if args.graph != "joint-before"
                    else f"graph {entry.index}: joint graph before the rewrite",
                    expand=False,
                )
            )
    return 0


def _paths(out: pathlib.Path, count: int) -> list:
    """One output path per captured graph: PATH itself, then PATH with .g1, .g2 … before the suffix."""
    return [out if i == 0 else out.with_name(f"{out.stem}.g{i}{out.suffix}") for i in range(count)]


def _records_by_node(run, index: int) -> dict:
    return {r.node: r for r in run.records if r.graph == index}


def cmd_export(args) -> int:
    from nmcompile.targets import CLIError

    _, err = _consoles()
    out = pathlib.Path(args.output)
    if out.parent and not out.parent.exists():
        raise CLIError(f"output directory {str(out.parent)!r} does not exist")
    if args.format == "onnx":
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise CLIError("--format onnx needs the onnx package: pip install 'nmcompile[onnx]'") from None
    run = _capture(args, err)
    written = []
    if args.format == "json":
        out.write_text(run.report.to_json() + "\n")
        written.append(out)
    elif args.format == "model-explorer":
        from nmcompile.export import model_explorer_graph, node_data
        from nmcompile.export.model_explorer import OVERLAYS, overlay_paths

        graphs, gms = [], {}
        for entry in run.graphs:
            records = _records_by_node(run, entry.index)
            for kind in ("joint-before", "joint", "forward", "backward"):
                gm = entry.get(kind)
                if gm is not None:
                    graph_id = f"g{entry.index}/{kind}"
                    gms[graph_id] = gm
                    graphs.append(model_explorer_graph(gm, graph_id, records if kind != "joint-before" else {}))
        out.write_text(json.dumps({"label": f"nmcompile {args.target}", "graphs": graphs}, indent=1))
        overlays = dict(zip(OVERLAYS, node_data(gms)))
        for name, path in overlay_paths(out).items():
            path.write_text(json.dumps(overlays[name], indent=1))
            written.append(path)
        written.insert(0, out)
    else:
        present = [e for e in run.graphs if e.get(args.graph) is not None]
        if not present:
            raise CLIError(
                f"the model produced no {args.graph} graph (an inference-only model has no joint/backward graph)"
            )
        for entry, path in zip(present, _paths(out, len(present))):
            gm = entry.get(args.graph)
            records = _records_by_node(run, entry.index) if args.graph != "joint-before" else {}
            graph_id = f"g{entry.index}/{args.graph}"
            if args.format == "dot":
                from nmcompile.export import to_dot

                path.write_text(to_dot(gm, graph_id, records))
            else:
                import onnx

                from nmcompile.version import __version__
                from nmcompile.export import onnx_op_counts, to_onnx

                if _holds_float8(gm):
                    raise CLIError(
                        "this graph holds float8 codes (lowering='native'), which ONNX's standard ops "
                        "(Transpose, Gemm) do not take: export --format onnx with \"lowering\": \"emulate\" "
                        "(the same values in the input dtype), or the native graph with --format model-explorer or dot"
                    )

                model = to_onnx(
                    gm,
                    graph_id.replace("/", "_"),
                    strip_stack_traces=args.strip_stack_traces,
                    model_props={
                        "nmcompile.version": __version__,
                        "nmcompile.target": args.target,
                        "nmcompile.graph": graph_id,
                        "nmcompile.options": json.dumps(run.options),
                    },
                )
                try:
                    onnx.checker.check_model(model, full_check=True)
                except Exception as e:  # a bug of ours, not the user's: say so in one line
                    raise CLIError(
                        f"the ONNX model for {graph_id} failed onnx.checker: {str(e).splitlines()[0]}"
                    ) from e
                onnx.save(model, str(path))
                counts = onnx_op_counts(model)
                nm = {k.split("::")[1]: v for k, v in counts.items() if k.startswith("com.nmcompile::")}
                opaque = sum(v for k, v in counts.items() if k.startswith("com.nmcompile.aten::"))
                err.print(
                    f"[dim]{path}: {sum(counts.values())} nodes, nm ops {nm or 'none'}, "
                    f"{opaque} opaque aten nodes; onnx.checker (full_check) passed[/dim]"
                )
            written.append(path)
    for path in written:
        sys.stdout.write(f"{path}\n")
    return 0


def cmd_profile(args) -> int:
    from nmcompile.passes import NMConfig
    from nmcompile.profiling import profile_run
    from nmcompile.targets import CLIError, trace_report

    out, err = _consoles()
    if args.steps < 1:
        raise CLIError(f"--steps must be at least 1, got {args.steps}")
    trace_path = pathlib.Path(args.output)
    if trace_path.parent and not trace_path.parent.exists():
        raise CLIError(f"output directory {str(trace_path.parent)!r} does not exist")
    model, inputs, options = _prepare(args, err)
    if "inner" not in options:
        options = {**options, "inner": "aot_eager"}
    config, _ = NMConfig.from_options(options)
    if config.inner != "aot_eager":
        err.print(
            "[yellow]note: with inner='inductor' the nm ops show as plain nm::<op> operator events, without "
            "module/role/pattern (use the default inner='aot_eager' for attribution)[/yellow]"
        )
    with _status(err, f"compiling {args.target} and profiling {args.steps} step(s) …"):
        run, annotator, changed, summary = profile_run(model, inputs, options, args.steps, str(trace_path))
    trace_report(run.report)
    if args.json:
        sys.stdout.write(
            json.dumps(
                {
                    "schema": "nmcompile.profile/1",
                    "trace": str(trace_path),
                    "options": options,
                    "annotated_events": changed,
                    "summary": summary.as_dict(),
                    "nm_ranges_us": summary.per_op,
                },
                indent=2,
            )
            + "\n"
        )
        return 0
    from rich.table import Table

    table = Table(title=f"{args.target}: {summary.steps} step(s), CPU-side time from the trace", title_justify="left")
    table.add_column("part")
    table.add_column("ms", justify="right")
    table.add_column("share", justify="right")
    total = summary.total_us or 1.0
    for name, us in (
        ("nm ops (MVUE / greedy / LUQ / SAWB)", summary.nm_us),
        ("GEMMs (mm / bmm / addmm / conv)", summary.gemm_us),
        ("everything else", summary.other_us),
    ):
        table.add_row(name, f"{us / 1e3:.2f}", f"{us / total:.0%}")
    table.add_section()
    table.add_row("[bold]total[/bold]", f"{summary.total_us / 1e3:.2f}", "100%")
    out.print(table)
    if summary.per_op:
        ops = Table(title="nm ranges (summed over steps)", title_justify="left")
        ops.add_column("range")
        ops.add_column("ms", justify="right")
        for name, us in sorted(summary.per_op.items(), key=lambda kv: -kv[1]):
            ops.add_row(name, f"{us / 1e3:.3f}")
        out.print(ops)
    out.print(
        f"trace: {trace_path} ({changed} nm events annotated with module/role/pattern) — open in https://ui.perfetto.dev"
    )
    return 0


def cmd_view(args) -> int:
    from nmcompile.viewers import serve, viewer_for

    _, err = _consoles()
    path = pathlib.Path(args.file)
    viewer = viewer_for(path)
    stdout = sys.stdout  # bound now: Model Explorer's own prints are sent to stderr while it runs

    def announce(url: str) -> None:
        stdout.write(url + "\n")
        stdout.flush()
        err.print(f"[dim]{viewer.name} is serving {path} at that URL; Ctrl-C stops it[/dim]")
        if args.browser:
            import webbrowser

            webbrowser.open(url)

    err.print(f"starting {viewer.name} on {path} …")
    serve(path, viewer, args.host, args.port, announce)
    err.print(f"[dim]{viewer.name} stopped[/dim]")
    return 0


def cmd_demo(args) -> int:
    from nmcompile.targets import CLIError

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


def cmd_bench(args) -> int:
    sys.stderr.write(
        "nmcompile bench: the benchmarks are scripts in tools/ (results in BENCHMARKS.md); "
        "run them from a source checkout, e.g. python tools/<script>.py\n"
    )
    return EXIT_USAGE


# -- parser -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from nmcompile.version import __version__

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
    p.add_argument("--json", action="store_true", help="print only the report JSON (schema nmcompile.report/2; "
                   "with --noise nmcompile.noise/1)")
    p.add_argument("--noise", action="store_true", help="measure, on the example inputs, the variance the gradient "
                   "compression adds to each rewritten backward GEMM, next to ‖G‖² and the minibatch noise")
    p.add_argument("--draws", type=int, default=2, help="independent draws per GEMM for --noise (default 2)")
    p.set_defaults(func=cmd_inspect)

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
    p.set_defaults(func=cmd_export)

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
    p.set_defaults(func=cmd_profile)

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
    p.set_defaults(func=cmd_view)

    p = sub.add_parser(
        "demo", help="train the digits MLP dense / MVUE / greedy / LUQ (nmcompile demo --help)", add_help=False
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_demo, debug=False)

    p = sub.add_parser("bench", help="benchmarks live in tools/ (prints where)")
    p.set_defaults(func=cmd_bench, debug=False)
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
        args = argparse.Namespace(command="demo", rest=argv[1:], func=cmd_demo, debug=False)
    else:
        args = parser.parse_args(argv)
    debug = getattr(args, "debug", False) or (args.command == "demo" and "--debug" in args.rest)
    from nmcompile.targets import CLIError

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

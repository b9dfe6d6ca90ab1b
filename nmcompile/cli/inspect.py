"""``nmcompile inspect``: the summary line, the GEMM table, the module tree and the rewritten graphs of a TARGET;
with ``--noise`` the gradient noise per rewritten backward GEMM."""
from __future__ import annotations

import json
import sys

from nmcompile.cli.common import capture, consoles, prepare, status
from nmcompile.cli.errors import CLIError


def _inspect_noise(args) -> int:
    from nmcompile.noise import NoiseMonitor

    out, err = consoles()
    if args.draws < 2:
        raise CLIError(f"--draws must be at least 2 (the variance needs two independent draws), got {args.draws}")
    model, inputs, options, _ = prepare(args, err)
    with status(err, f"measuring the gradient noise of {args.target} ({args.draws} draws per GEMM) …"):
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


def run(args) -> int:
    if args.noise:
        return _inspect_noise(args)
    out, err = consoles()
    captured = capture(args, err)
    report = captured.report
    if args.json:
        sys.stdout.write(report.to_json() + "\n")
        return 0
    from rich.panel import Panel
    from rich.syntax import Syntax

    from nmcompile.export import graph_code
    from nmcompile.report import gemm_table, graph_break_table, kept_table, module_tree

    s = report.summary()
    out.print(f"[bold]{args.target}[/bold]: {captured.config.describe()} — {s['rewritten']} of {s['gemms']} GEMMs "
              f"rewritten, {s['skipped']} skipped; backward FLOPs with a sparse gradient {s['sparse_flop_share']:.0%}, "
              f"with a 4-bit gradient {s['quant_flop_share']:.0%}"
              + (f"; [yellow]{s['graph_breaks']} graph break(s)[/yellow] (below)" if s["graph_breaks"] else ""))
    out.print(gemm_table(report, f"GEMMs ({len(report.gemms)}), in {len(captured.graphs)} graph(s)"))
    out.print("[dim]TC speedup: peak tensor-core math ratio vs dense bf16 on H100 (2:4 sparse ×2, both operands "
              "4-bit → FP8 ×2); an upper bound, see docs/cli.md[/dim]")
    out.print(kept_table(report, "What the backward keeps (the partitioned graphs of this step)"))
    out.print(module_tree(report, f"{args.target} by module"))
    if report.graph_breaks:
        out.print(graph_break_table(report, f"Graph breaks ({s['graph_breaks']}): GEMMs in code that runs eagerly "
                                            "never reach the pass"))
    if args.graph != "none":
        for entry in captured.graphs:
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

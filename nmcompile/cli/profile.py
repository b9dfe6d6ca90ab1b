"""``nmcompile profile``: profile training steps of a TARGET (``nmcompile.profiling``), print where the time went
and write a Chrome/Perfetto trace whose nm events carry module, role and pattern."""
from __future__ import annotations

import json
import pathlib
import sys

from nmcompile.cli.common import consoles, prepare, status, trace_report
from nmcompile.cli.errors import CLIError, as_cli_error
from nmcompile.passes.config import Inner


def time_table(summary, target: str):
    """The rich table of the profiled steps' CPU-side time: nm ops, GEMMs, everything else."""
    from rich.table import Table

    table = Table(title=f"{target}: {summary.steps} step(s), CPU-side time from the trace", title_justify="left")
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
    return table


def ranges_table(summary):
    """The rich table of the time in each nm range, summed over the steps (None when there is none)."""
    from rich.table import Table

    if not summary.per_op:
        return None
    ops = Table(title="nm ranges (summed over steps)", title_justify="left")
    ops.add_column("range")
    ops.add_column("ms", justify="right")
    for name, us in sorted(summary.per_op.items(), key=lambda kv: -kv[1]):
        ops.add_row(name, f"{us / 1e3:.3f}")
    return ops


def run(args) -> int:
    from nmcompile.capture import ModelRunError
    from nmcompile.profiling import profile_run

    out, err = consoles()
    if args.steps < 1:
        raise CLIError(f"--steps must be at least 1, got {args.steps}")
    trace_path = pathlib.Path(args.output)
    if trace_path.parent and not trace_path.parent.exists():
        raise CLIError(f"output directory {str(trace_path.parent)!r} does not exist")
    model, inputs, options, config = prepare(args, err, defaults={"inner": "aot_eager"})
    if config.inner != Inner.AOT_EAGER:
        err.print(
            "[yellow]note: with inner='inductor' the nm ops show as plain nm::<op> operator events, without "
            "module/role/pattern (use the default inner='aot_eager' for attribution)[/yellow]"
        )
    with status(err, f"compiling {args.target} and profiling {args.steps} step(s) …"), as_cli_error(ModelRunError):
        run, annotator, changed, summary = profile_run(model, inputs, options, config, args.steps, str(trace_path))
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
    out.print(time_table(summary, args.target))
    ops = ranges_table(summary)
    if ops is not None:
        out.print(ops)
    out.print(
        f"trace: {trace_path} ({changed} nm events annotated with module/role/pattern) — open in https://ui.perfetto.dev"
    )
    return 0

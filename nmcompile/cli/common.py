"""What the CLI's commands share: the two consoles, the progress line, and loading + capturing a TARGET (inspect,
export). Its errors are in ``cli.errors``, which ``cli.targets`` imports too: this module imports targets, not the
other way round."""
from __future__ import annotations

import contextlib
import json

from nmcompile.cli.errors import as_cli_error
from nmcompile.passes.config import Inner


def consoles():
    """(stdout console, stderr console): machine output on stdout, progress and diagnostics on stderr."""
    from rich.console import Console

    return Console(highlight=False), Console(stderr=True, highlight=False)


@contextlib.contextmanager
def status(err_console, text: str):
    """A spinner on stderr when it is a terminal, a plain line otherwise."""
    if err_console.is_terminal:
        with err_console.status(text):
            yield
    else:
        err_console.print(text)
        yield


def prepare(args, err, defaults=None):
    """``--options`` parsed (``defaults`` added where the user gave none) and TARGET loaded:
    (model, inputs, options, config)."""
    from nmcompile.cli.targets import load_target, parse_options  # torch and the models: only when a command runs

    options, config = parse_options(args.options, defaults)
    with status(err, f"loading {args.target} …"):
        model, inputs = load_target(args.target)
    return model, inputs, options, config


def capture(args, err):
    """TARGET compiled with the capturing backend and run for one step (``nmcompile.capture.Run``)."""
    from nmcompile.capture import ModelRunError, run_captured

    model, inputs, options, config = prepare(args, err)
    if config.inner != Inner.AOT_EAGER:
        err.print(f"[dim]note: graphs captured with inner='aot_eager' so the nm ops stay visible; "
                  f"the rewrite is the same as with inner={str(config.inner)!r}[/dim]")
    with status(err, f"compiling {args.target} with options {json.dumps(options)} and running one step …"):
        with as_cli_error(ModelRunError):
            run = run_captured(model, inputs, options, config=config)
    if trace_report(run.report):
        err.print("[dim]TORCH_TRACE: report logged as artifact 'nmcompile_report'[/dim]")
    return run


def trace_report(report) -> bool:
    """Log the whole report as the TORCH_TRACE artifact ``nmcompile_report``; True when logged (the
    pass itself logs each rewritten graph, inside its compile)."""
    from nmcompile.passes.trace_log import REPORT, log_artifact

    return log_artifact(REPORT, "json", report.to_json)

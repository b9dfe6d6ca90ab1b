"""The CLI's errors and exit statuses: one home that every CLI module imports (and that imports none of them)."""
from __future__ import annotations

import contextlib

EXIT_ERROR = 1  # a CLIError or any other failure
EXIT_USAGE = 2  # argparse's status for bad usage


class CLIError(Exception):
    """A problem the user can fix; the CLI prints its message as one line and exits non-zero."""


@contextlib.contextmanager
def as_cli_error(*types: type):
    """Errors of ``types`` raised by the library (their messages are written for the user) become CLIErrors
    with the same message."""
    try:
        yield
    except types as err:
        raise CLIError(str(err)) from err

"""``nmcompile view``: serve an exported file in Netron or Model Explorer (``nmcompile.viewers``) until Ctrl-C."""
from __future__ import annotations

import pathlib
import sys

from nmcompile.cli.common import consoles
from nmcompile.cli.errors import as_cli_error


def run(args) -> int:
    from nmcompile.viewers import ViewerError, serve, viewer_for

    _, err = consoles()
    path = pathlib.Path(args.file)
    with as_cli_error(ViewerError):
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
    with as_cli_error(ViewerError):
        serve(path, viewer, args.host, args.port, announce)
    err.print(f"[dim]{viewer.name} stopped[/dim]")
    return 0

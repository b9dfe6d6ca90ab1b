"""``nmcompile view FILE``: serve an exported file in the web viewer made for it until Ctrl-C.

An ONNX file (``export --format onnx``) opens in Netron; a Model Explorer collection (``export --format
model-explorer``) opens in Google's Model Explorer, with the density and bits overlays written beside it.
Both viewers are web apps shipped as Python packages (the ``viewers`` extra); they run in this process,
bound to a local port, and the page's URL is the only thing printed on stdout.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import socket
import sys
import threading
import time
from typing import Callable

EXTRA = "pip install 'nmcompile[viewers]'"


@dataclasses.dataclass(frozen=True)
class Viewer:
    name: str  # as users know it
    module: str  # what is imported
    package: str  # what pip installs


class ViewerError(ValueError):
    """A file this module cannot serve, a viewer that is not installed or a port it cannot use: the message
    says which and what to do (the CLI prints it as one line)."""


NETRON = Viewer("Netron", "netron", "netron")
MODEL_EXPLORER = Viewer("Model Explorer", "model_explorer", "ai-edge-model-explorer")


def viewer_for(path: pathlib.Path) -> Viewer:
    """The viewer for an exported file, or a ViewerError saying what the file is and what to do instead."""
    if not path.is_file():
        raise ViewerError(f"file {str(path)!r} does not exist")
    if path.suffix == ".onnx":
        return NETRON
    if path.suffix == ".dot":
        raise ViewerError(f"{path} is Graphviz DOT, which has no viewer here: render it with dot -Tsvg {path} "
                          "-o out.svg")
    if path.suffix != ".json":
        raise ViewerError(f"cannot view {str(path)!r}: expected an .onnx file (Netron) or a Model Explorer .json "
                       "collection (Model Explorer), as nmcompile export --format onnx|model-explorer writes them")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ViewerError(f"{path} is not valid JSON: {err}") from None
    if isinstance(data, dict) and isinstance(data.get("graphs"), list):
        return MODEL_EXPLORER
    if isinstance(data, dict) and "traceEvents" in data:
        raise ViewerError(f"{path} is a profiler trace: open it in https://ui.perfetto.dev or load it with "
                       "Holistic Trace Analysis (see docs/cli.md)")
    if isinstance(data, dict) and str(data.get("schema", "")).startswith("nmcompile.report"):
        raise ViewerError(f"{path} is an nmcompile report, not a graph: nmcompile inspect prints it as tables")
    if isinstance(data, dict) and data and all(isinstance(v, dict) and "results" in v for v in data.values()):
        raise ViewerError(f"{path} is a node-data overlay: view the collection it belongs to, which loads it")
    raise ViewerError(f"{path} is JSON but not a Model Explorer graph collection (nmcompile export --format "
                   "model-explorer writes one)")


def _import(viewer: Viewer, path: pathlib.Path):
    try:
        return __import__(viewer.module)
    except ImportError:
        raise ViewerError(f"viewing {path.name} needs {viewer.name} (PyPI package {viewer.package}), which is not "
                       f"installed: {EXTRA}") from None


def free_port(host: str, port: int) -> int:
    """``port`` when it is free on ``host``, any free port when it is 0."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            if port:
                raise ViewerError(f"port {port} on {host} is not available ({err.strerror}): choose another "
                               "with --port") from None
            raise ViewerError(f"cannot listen on host {host!r}: {err.strerror}") from None
        return sock.getsockname()[1]


def serve(path: pathlib.Path, viewer: Viewer, host: str, port: int, announce: Callable[[str], None]) -> None:
    """Serve ``path`` in ``viewer``; ``announce(url)`` once the page answers; returns after Ctrl-C."""
    module = _import(viewer, path)
    port = free_port(host, port)
    if viewer is NETRON:
        _serve_netron(module, path, host, port, announce)
    else:
        _serve_model_explorer(module, path, host, port, announce)


def _serve_netron(netron, path: pathlib.Path, host: str, port: int, announce) -> None:
    netron.serve(str(path), address=(host, port), browse=False)  # returns once the server thread runs
    announce(f"http://{_url_host(host)}:{port}/")
    netron.wait()  # until Ctrl-C, which it answers by stopping the server


def _serve_model_explorer(model_explorer, path: pathlib.Path, host: str, port: int, announce) -> None:
    from model_explorer import server

    from nmcompile.export.model_explorer import overlay_paths

    config = model_explorer.config().add_model_from_path(str(path.resolve()))
    for overlay in overlay_paths(path).values():
        if overlay.is_file():
            config.add_node_data_from_path(str(overlay.resolve()))
    # The same URL Model Explorer prints: it names the files to load and the overlays to apply.
    url = f"http://{_url_host(host)}:{port}/?data={config.to_url_param_value()}"
    threading.Thread(target=_announce_when_up, args=(host, port, url, announce), daemon=True).start()
    # Its progress lines go to stderr: stdout carries only the URL. It returns on Ctrl-C.
    with contextlib.redirect_stdout(sys.stderr):
        server.start(host=host, port=port, config=config, no_open_in_browser=True)


def _announce_when_up(host: str, port: int, url: str, announce, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            announce(url)
            return
        time.sleep(0.05)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host

"""The exported files in the tools people open them with: ``nmcompile view`` serving them until Ctrl-C,
Model Explorer and Netron rendering them in headless Chromium (``browser`` tests), Holistic Trace
Analysis reading ``nmcompile profile``'s trace.

``NMCOMPILE_SCREENSHOTS=DIR`` keeps the browser tests' screenshots in DIR (docs/ holds the ones shown
in docs/cli.md)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import pytest

from nmcompile.cli import main

NMCOMPILE = pathlib.Path(sys.executable).with_name("nmcompile")
OPTIONS = '{"sparsity": "2:4", "quant": "luq"}'
VIEWERS_MISSING = "(pip install 'nmcompile[viewers]')"
# Without these Chromium waits on the network (blocked here and in CI); swiftshader renders WebGL on the CPU.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--enable-unsafe-swiftshader", "--window-size=1200,700"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """The mlp target (MVUE 2:4 + LUQ) exported as ONNX and as a Model Explorer collection."""
    out = tmp_path_factory.mktemp("exported")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["export", "mlp", "-f", "onnx", "-o", str(out / "mlp.onnx"), "--options", OPTIONS]) == 0
        assert main(["export", "mlp", "-f", "model-explorer", "-o", str(out / "mlp.json"), "--options", OPTIONS]) == 0
    return {"onnx": out / "mlp.onnx", "model-explorer": out / "mlp.json"}


# -- nmcompile view: which viewer, and the errors ---------------------------------------------------
def _write(path: pathlib.Path, content) -> str:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("missing.onnx", None, "does not exist"),
        ("g.dot", "digraph {}", "is Graphviz DOT"),
        ("notes.txt", "hello", "expected an .onnx file (Netron) or a Model Explorer .json"),
        ("broken.json", "{", "is not valid JSON"),
        ("trace.json", {"traceEvents": []}, "is a profiler trace: open it in https://ui.perfetto.dev"),
        ("report.json", {"schema": "nmcompile.report/2", "gemms": []}, "is an nmcompile report"),
        ("me.density.json", {"g0/joint": {"results": {}}}, "is a node-data overlay"),
        ("other.json", [1, 2], "not a Model Explorer graph collection"),
    ],
)
def test_view_says_in_one_line_what_a_file_is_when_it_has_no_viewer(tmp_path, capsys, name, content, words):
    path = str(tmp_path / name) if content is None else _write(tmp_path / name, content)
    assert main(["view", path]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("nmcompile: error: ") and words in lines[0], err


@pytest.mark.parametrize("module, name, content, viewer, package", [
    ("netron", "m.onnx", "", "Netron", "netron"),
    ("model_explorer", "m.json", {"label": "x", "graphs": []}, "Model Explorer", "ai-edge-model-explorer"),
])
def test_view_names_the_extra_when_the_viewer_is_not_installed(tmp_path, capsys, monkeypatch, module, name,
                                                               content, viewer, package):
    monkeypatch.setitem(sys.modules, module, None)  # what an environment without the package has
    assert main(["view", _write(tmp_path / name, content)]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"nmcompile: error: viewing {name} needs {viewer} (PyPI package {package}), which is not "
                    "installed: pip install 'nmcompile[viewers]'")


def test_view_refuses_a_port_in_use(tmp_path, capsys):
    pytest.importorskip("netron", reason=f"netron is not installed {VIEWERS_MISSING}")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["view", _write(tmp_path / "m.onnx", ""), "--port", str(port)]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"nmcompile: error: port {port} on 127.0.0.1 is not available") and "--port" in last


# -- nmcompile view: serving until Ctrl-C -----------------------------------------------------------
class Served:
    """``nmcompile view FILE`` as a user runs it: the URL is read from stdout, Ctrl-C is SIGINT."""

    def __init__(self, path: pathlib.Path):
        # SIGINT as a terminal delivers it, even when this test runs in a shell's background job
        self.proc = subprocess.Popen([str(NMCOMPILE), "view", str(path)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env={**os.environ, "NO_COLOR": "1"},
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        ready, _, _ = select.select([self.proc.stdout], [], [], 120)
        self.url = self.proc.stdout.readline().strip() if ready else ""
        if not self.url.startswith("http://127.0.0.1:"):
            self.proc.kill()
            pytest.fail(f"nmcompile view printed no URL: {self.proc.communicate()[1][-2000:]}")

    def ctrl_c(self) -> tuple:
        """(exit code, rest of stdout, stderr) after Ctrl-C."""
        self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, out, err

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@contextlib.contextmanager
def served(path: pathlib.Path):
    server = Served(path)
    try:
        yield server
    finally:
        server.close()


def test_view_serves_netron_and_stops_cleanly_on_ctrl_c(exported):
    pytest.importorskip("netron", reason=f"netron is not installed {VIEWERS_MISSING}")
    with served(exported["onnx"]) as server:
        page = urllib.request.urlopen(server.url, timeout=30).read().decode()
        assert "<title>Netron</title>" in page
        code, out, err = server.ctrl_c()
    assert code == 0 and out == "", err
    assert err.strip().splitlines()[-1] == "Netron stopped"


# -- the pages, in Chromium -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("Chromium is not installed (apt-get install chromium chromium-driver; make test does it as root)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    with tempfile.TemporaryDirectory() as profile:
        for arg in [*CHROMIUM_ARGS, f"--user-data-dir={profile}"]:
            options.add_argument(arg)
        session = webdriver.Chrome(service=Service(driver), options=options)
        session.set_page_load_timeout(60)
        try:
            yield session
        finally:
            session.quit()


def _wait(browser, condition, what: str, timeout: float = 180):
    # generous: on a 2-core machine busy with other work, Model Explorer took over 60 s to render a selection
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(browser, timeout, poll_frequency=0.2).until(lambda b: condition(b))
    except Exception as err:  # TimeoutException: say what was on the page instead
        text = browser.execute_script("return document.body.innerText")[:1500]
        raise AssertionError(f"timed out waiting for {what}; the page shows: {text!r}") from err


def _screenshot(browser, name: str) -> "object":
    """The page as RGB pixels (numpy array); kept as DIR/NAME (palette PNG) when NMCOMPILE_SCREENSHOTS=DIR."""
    import numpy as np
    from PIL import Image

    time.sleep(1.0)  # the WebGL / SVG frame after the last layout
    image = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
    keep = os.environ.get("NMCOMPILE_SCREENSHOTS")
    if keep:
        image.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(pathlib.Path(keep) / name, optimize=True)
    return np.asarray(image)


def _pixels_near(pixels, color: str, tolerance: int = 12) -> int:
    import numpy as np

    rgb = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(pixels.astype(int) - rgb).max(axis=-1) <= tolerance).sum())


TABLES = """return [...document.querySelectorAll('table')].map(t => [...t.querySelectorAll('tr')].map(
    r => [...r.querySelectorAll('td,th')].map(c => c.innerText.trim())))"""


@pytest.mark.browser
def test_model_explorer_renders_the_collection_with_its_overlays(browser, exported):
    pytest.importorskip("model_explorer", reason=f"ai-edge-model-explorer is not installed {VIEWERS_MISSING}")
    from nmcompile.export import NM_COLORS

    path = exported["model-explorer"]
    collection = json.loads(path.read_text())
    nodes = {g["id"]: g["nodes"] for g in collection["graphs"]}
    with served(path) as server:
        # The page `nmcompile view` prints: the collection, both overlays, no error.
        browser.get(server.url)
        _wait(browser, lambda b: "op node count" in b.execute_script("return document.body.innerText"),
              "the graph info panel")
        text = browser.execute_script("return document.body.innerText")
        for error in ("No graphs", "Failed", "Error"):
            assert error not in text
        graph = browser.find_element("css selector", "graph-selector .option-label").text.strip()
        count = browser.find_element("css selector", "graph-selector .node-count-label").text.strip()
        assert graph in nodes and count == f"{len(nodes[graph])} nodes"
        tables = browser.execute_script(TABLES)
        info = {row[0]: row[1] for table in tables for row in table if len(row) == 2}
        assert info["op node count"] == str(len(nodes[graph]))
        providers = [e.text for e in browser.find_elements("css selector", ".run-name")]
        assert providers == ["mlp.density.json", "mlp.bits.json"]
        # Aggregated over the graph's nodes: 2:4 keeps half, LUQ is 4 bits.
        stats = next(t for t in tables if t and t[0][:1] == ["Stat"])
        by_stat = {row[0]: row[1:] for row in stats[1:]}
        assert by_stat["Min"] == ["0.5", "4"] and by_stat["Max"] == ["0.5", "4"]

        # The same page with the head layer's MVUE node selected (Model Explorer's own URL state).
        data = json.loads(urllib.parse.unquote(server.url.split("data=", 1)[1]))
        data["uiState"] = {"paneStates": [{"deepestExpandedGroupNodeIds": ["head"], "selectedNodeId": "mvue",
                                           "selectedGraphId": "g0/joint", "selectedCollectionLabel": "nmcompile mlp",
                                           "widthFraction": 1, "selected": False}]}
        browser.get(server.url.split("?")[0] + "?data=" + urllib.parse.quote(json.dumps(data)))
        _wait(browser, lambda b: "NODE INFO" in b.execute_script("return document.body.innerText").upper()
              and "nm.role" in b.execute_script("return document.body.innerText"), "the selected node's panel")
        info = {row[0]: row[1] for table in browser.execute_script(TABLES) for row in table if len(row) == 2}
        assert (info["op name"], info["id"], info["namespace"]) == ("nm.mvue", "mvue", "head")
        assert (info["nm.role"], info["nm.pattern"], info["nm.gemm"]) == ("wgrad", "2:4", "mm_1")
        assert (info["mlp.density.json"], info["mlp.bits.json"]) == ("0.5", "-")  # its overlay values
        # WebGL drew the nm nodes: the MVUE node in its colour, the LUQ nodes in the bits overlay's 4-bit colour.
        pixels = _screenshot(browser, "model-explorer.png")
        assert _pixels_near(pixels, NM_COLORS["mvue"]) > 1000
        assert _pixels_near(pixels, "#7048e8") > 1000

        code, out, err = server.ctrl_c()
    assert code == 0 and out == "", err
    assert err.strip().splitlines()[-1] == "Model Explorer stopped"


@pytest.mark.browser
def test_netron_renders_the_onnx_graph_with_the_nm_nodes(browser, exported):
    pytest.importorskip("netron", reason=f"netron is not installed {VIEWERS_MISSING}")
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(exported["onnx"]))
    nm_nodes = sorted(n.name.split("/")[0] for n in model.graph.node if n.domain == "com.nmcompile")
    assert nm_nodes == ["luq", "luq_1", "luq_2", "luq_3", "luq_4", "mvue", "mvue_1", "mvue_2"]
    with served(exported["onnx"]) as server:
        browser.get(server.url)

        def rendered_or_asked(b):  # Netron asks for cookie consent first in some regions
            consent = [e for e in b.find_elements("id", "message-button") if e.is_displayed()]
            if consent and consent[0].text == "Accept":
                consent[0].click()
            return b.execute_script("return document.querySelectorAll('g.graph-node').length") > 0

        _wait(browser, rendered_or_asked, "the graph")
        assert "alert" not in browser.execute_script("return document.body.className")  # Netron's error state
        ids = browser.execute_script("return [...document.querySelectorAll('g.graph-node')].map(g => g.id)")
        assert len(ids) == len(model.graph.node)
        shown = sorted(i.removeprefix("node-name-").split("/")[0] for i in ids
                       if i.split("/")[1:2] in (["MVUE"], ["LUQ"]))
        assert shown == nm_nodes

        # Select the MVUE node of the head layer: its properties come from the ONNX node.
        node = browser.find_element("css selector", '[id^="node-name-mvue/MVUE/"] .node-item')
        # Netron's node handles a plain click event; dispatching it does not depend on where the view has
        # scrolled the node (a pointer click can land on the toolbar above it, as it did on a loaded CPU)
        browser.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", node)
        _wait(browser, lambda b: b.find_elements("css selector", "#sidebar .sidebar-item"), "the node's properties")
        items = browser.execute_script("""return [...document.querySelectorAll('#sidebar .sidebar-item')].map(
            i => [i.querySelector('.sidebar-item-name input')?.value, i.querySelector('.sidebar-item-value-line')
            ?.innerText.trim()])""")
        props = {k: v for k, v in items if k}
        assert (props["type"], props["module"]) == ("MVUE", "com.nmcompile")
        assert (props["n"], props["m"]) == ("2", "4")
        assert (props["nm.role"], props["nm.module"], props["nm.pattern"]) == ("wgrad", "head", "2:4")
        pixels = _screenshot(browser, "netron.png")
        assert _pixels_near(pixels, "#333333", 2) > 2000  # the SVG was drawn: Netron fills op nodes with #333
        code, _, err = server.ctrl_c()
    assert code == 0, err


# -- Holistic Trace Analysis ------------------------------------------------------------------------
def test_hta_reads_the_nm_events_and_their_args(tmp_path):
    pytest.importorskip("hta", reason=f"holistictraceanalysis is not installed {VIEWERS_MISSING}")
    from hta.configs.parser_config import ParserConfig
    from hta.trace_analysis import TraceAnalysis

    traces = tmp_path / "traces"
    traces.mkdir()
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["profile", "mlp", "--steps", "2", "-o", str(traces / "mlp.json"), "--json",
                     "--options", OPTIONS]) == 0
    # HTA parses only the args it is told about; these are the ones nmcompile adds to the nm events.
    config = ParserConfig()
    config.add_args([ParserConfig.make_attribute_spec(key, "") for key in ("module", "role", "pattern", "gemm")])
    previous = ParserConfig.get_default_cfg()
    ParserConfig.set_default_cfg(config)
    try:
        analysis = TraceAnalysis(trace_dir=str(traces), include_last_profiler_step=True)  # every step is whole
    finally:
        ParserConfig.set_default_cfg(previous)
    df = analysis.t.get_trace(0)
    symbols = analysis.t.symbol_table.sym_table
    df["op"], df["category"] = df["name"].map(symbols.__getitem__), df["cat"].map(symbols.__getitem__)
    ops = df[(df["category"] == "cpu_op") & df["op"].str.startswith("nm::")]
    # Per step: MVUE on the 3 wgrad GEMMs, LUQ on those and the 2 dgrad GEMMs; 2 steps.
    assert ops.groupby(["op", "role"]).size().to_dict() == {("nm::luq", "dgrad"): 4, ("nm::luq", "wgrad"): 6,
                                                           ("nm::mvue", "wgrad"): 6}
    mvue = ops[ops["op"] == "nm::mvue"]
    assert set(mvue["module"]) == {"fc1", "fc2", "head"} and set(mvue["pattern"]) == {"2:4"}
    assert set(ops[ops["op"] == "nm::luq"]["pattern"]) == {"luq4"}
    assert mvue.groupby("module")["gemm"].nunique().to_dict() == {"fc1": 1, "fc2": 1, "head": 1}
    assert sorted(set(ops["iteration"])) == [0, 1]  # the steps are ProfilerStep#0, #1
    assert (ops.groupby("module")["dur"].sum() > 0).all()

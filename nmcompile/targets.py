"""CLI plumbing: load a TARGET, parse ``--options``, and capture the rewritten graphs of a run.

A TARGET is a built-in example name (``mlp``, ``cnn``, ``gpt``) or ``FILE.py:FACTORY`` /
``package.module:FACTORY`` where ``FACTORY()`` returns ``(model, example_inputs)``.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import pathlib
import sys
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

DEFAULT_OPTIONS = {"sparsity": "2:4"}


class CLIError(Exception):
    """A problem the user can fix; the CLI prints its message as one line and exits non-zero."""


# -- TARGET ------------------------------------------------------------------------------------
def load_target(spec: str) -> tuple[torch.nn.Module, tuple]:
    from nmcompile.examples import EXAMPLES

    if spec in EXAMPLES:
        factory, where = EXAMPLES[spec][0], f"built-in example {spec!r}"
    else:
        factory, where = _load_factory(spec), spec
    try:
        result = factory()
    except Exception as err:
        raise CLIError(f"{where}: the factory raised {type(err).__name__}: {_one_line(err)}") from err
    if not (isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise CLIError(f"{where}: the factory must return (model, example_inputs), got {type(result).__name__}")
    model, inputs = result
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)):
        raise CLIError(f"{where}: example_inputs must be a tuple of inputs, got {type(inputs).__name__}")
    return model, tuple(inputs)


def _load_factory(spec: str) -> Callable:
    from nmcompile.examples import EXAMPLES

    if ":" not in spec:
        raise CLIError(f"unknown target {spec!r}: use a built-in example ({', '.join(EXAMPLES)}) or FILE.py:FACTORY")
    where, name = spec.rsplit(":", 1)
    if not where or not name:
        raise CLIError(f"target {spec!r}: expected FILE.py:FACTORY")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = pathlib.Path(where)
        if not path.is_file():
            raise CLIError(f"target file {where!r} does not exist")
        module_name = f"_nmcompile_target_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as err:
            raise CLIError(f"importing {where!r} failed: {type(err).__name__}: {_one_line(err)}") from err
    else:
        try:
            module = importlib.import_module(where)
        except Exception as err:
            raise CLIError(f"cannot import module {where!r}: {type(err).__name__}: {_one_line(err)}") from err
    factory = getattr(module, name, None)
    if factory is None:
        raise CLIError(f"{where!r} has no factory {name!r}")
    if not callable(factory):
        raise CLIError(f"{where}:{name} is not callable")
    return factory


def parse_options(text: Optional[str]) -> dict:
    """``--options`` JSON -> backend options, validated by NMConfig (default ``{"sparsity": "2:4"}``)."""
    from nmcompile.passes import NMConfig

    if text is None:
        options = dict(DEFAULT_OPTIONS)
    else:
        try:
            options = json.loads(text)
        except json.JSONDecodeError as err:
            raise CLIError(f"--options is not valid JSON: {err}") from err
        if not isinstance(options, dict):
            raise CLIError(f"--options must be a JSON object, got {type(options).__name__}")
    try:
        NMConfig.from_options(options)
    except (ValueError, TypeError) as err:
        raise CLIError(f"bad option: {_one_line(err)}") from err
    return options


def _one_line(err: BaseException) -> str:
    inner = getattr(err, "inner_exception", None)  # Dynamo's BackendCompilerFailed wraps the real error
    if isinstance(inner, BaseException):
        return f"{type(inner).__name__}: {_one_line(inner)}"
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# -- capturing the graphs ----------------------------------------------------------------------
@dataclasses.dataclass
class CapturedGraph:
    """The graphs AOTAutograd produced for one Dynamo graph."""

    index: int
    joint_before: Optional[fx.GraphModule] = None  # the joint graph before the nm rewrite
    joint: Optional[fx.GraphModule] = None  # after the rewrite, before partitioning
    forward: Optional[fx.GraphModule] = None
    backward: Optional[fx.GraphModule] = None

    def get(self, which: str) -> Optional[fx.GraphModule]:
        return {"joint": self.joint, "joint-before": self.joint_before, "forward": self.forward,
                "backward": self.backward}[which]


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A structural copy (node metadata copied shallowly) that later passes cannot change."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {}, return_output_node=True)
    if isinstance(out, tuple):  # (output value, output node)
        out, node = out
    graph.output(out)
    return fx.GraphModule(gm, graph)


def capture_backend(options: dict, graphs: list, records: list,
                    wrap: Optional[Callable[[fx.GraphModule, str, int], None]] = None):
    """A Dynamo backend equal to ``nm`` with ``inner="aot_eager"`` that also keeps the graphs.

    ``graphs[i]`` holds Dynamo's i-th graph; its records carry ``graph == i``, inference-only graphs
    included (they have no joint graph and no records). ``wrap(graph_module, "forward"|"backward",
    index)`` may edit the partitioned graphs before they run (the profiler wraps the nm nodes in
    ``record_function`` ranges).
    """
    from nmcompile.backend import aot_eager
    from nmcompile.passes import NMConfig, NMJointPass

    config, _ = NMConfig.from_options(options)

    def backend(gm: fx.GraphModule, example_inputs):
        entry = CapturedGraph(len(graphs))
        graphs.append(entry)

        def on_joint(joint: fx.GraphModule, when: str) -> None:
            if when == "before":
                entry.joint_before = copy_graph_module(joint)
            else:  # the pass itself logs the rewritten graph for tlparse
                entry.joint = copy_graph_module(joint)

        def on_graph(graph: fx.GraphModule, kind: str) -> None:
            setattr(entry, kind, graph)
            if wrap is not None:
                wrap(graph, kind, entry.index)

        joint_pass = NMJointPass(config, decompose=False, records=records, first_graph=entry.index)
        return aot_eager(gm, example_inputs, joint_pass, on_joint=on_joint, on_graph=on_graph)

    return backend


@dataclasses.dataclass
class Run:
    model: torch.nn.Module
    inputs: tuple
    options: dict
    graphs: list
    records: list
    compiled: Any = None

    @property
    def report(self):
        from nmcompile.passes import NMConfig
        from nmcompile.report import Report

        return Report(list(self.records), NMConfig.from_options(self.options)[0].as_dict())


def step(compiled, model: torch.nn.Module, inputs: tuple) -> None:
    """One forward + backward; gradients are dropped afterwards."""
    from nmcompile.explain import reduce_output

    reduce_output(compiled(*inputs)).backward()
    for p in model.parameters():
        p.grad = None


def run_captured(model: torch.nn.Module, inputs: tuple, options: dict, wrap=None) -> Run:
    """Compile with the capturing backend and run one forward + backward."""
    import torch._functorch.config as functorch_config

    torch._dynamo.reset()
    graphs: list = []
    records: list = []
    backend = capture_backend(options, graphs, records, wrap)
    compiled = torch.compile(model, backend=backend)
    with functorch_config.patch(enable_autograd_cache=False):
        try:
            step(compiled, model, inputs)
        except Exception as err:
            raise CLIError(f"the model failed to run: {type(err).__name__}: {_one_line(err)}") from err
    return Run(model, inputs, options, graphs, records, compiled)


# -- TORCH_TRACE -------------------------------------------------------------------------------
def trace_report(report) -> bool:
    """Log the whole report as the TORCH_TRACE artifact ``nmcompile_report``; True when logged (the
    pass itself logs each rewritten graph, inside its compile)."""
    from nmcompile.passes.trace_log import REPORT, log_artifact

    return log_artifact(REPORT, "json", report.to_json)

"""Capturing what the nm backend does: a Dynamo backend equal to ``nm`` with ``inner="aot_eager"`` that keeps
every graph AOTAutograd produces (joint before and after the rewrite, forward, backward), and one captured
training step. Shared by the CLI (inspect, export, profile), the profiler and the tests; ``explain`` and the
noise monitor use its ``reduce_output``.

Graph indices come from a :class:`nmcompile.backend.GraphCounter`, as everywhere in the package.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from nmcompile.backend import GraphCounter, aot_eager
from nmcompile.graph_breaks import collecting
from nmcompile.passes.config import NMConfig
from nmcompile.passes.joint_pass import NMJointPass


class ModelRunError(RuntimeError):
    """The model failed to run under the capturing backend (its message says why, in one line)."""


def one_line(err: BaseException) -> str:
    """An exception's message in one line; Dynamo's BackendCompilerFailed is unwrapped to the real error."""
    inner = getattr(err, "inner_exception", None)  # Dynamo's BackendCompilerFailed wraps the real error
    if isinstance(inner, BaseException):
        return f"{type(inner).__name__}: {one_line(inner)}"
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def reduce_output(out: Any) -> torch.Tensor:
    """The scalar to backpropagate: ``out.loss`` when present, else the sum of every floating-point
    tensor in the output (tuples, lists, dicts and Hugging Face ModelOutputs included)."""
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    if isinstance(out, dict) and isinstance(out.get("loss"), torch.Tensor):
        return out["loss"]
    tensors = [t for t in torch.utils._pytree.tree_leaves(out)
               if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
    if not tensors:
        raise ValueError("the model's output has no floating-point tensor that requires grad; nothing to backpropagate")
    return sum(t.float().sum() for t in tensors)


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


def capture_backend(config: NMConfig, graphs: list, records: list,
                    wrap: Optional[Callable[[fx.GraphModule, str, int], None]] = None,
                    counter: Optional[GraphCounter] = None):
    """A Dynamo backend equal to ``nm`` with ``inner="aot_eager"`` that also keeps the graphs.

    ``graphs[i]`` holds Dynamo's i-th graph, numbered by ``counter`` (a new GraphCounter by default); its
    records carry ``graph == i``, inference-only graphs included (they have no joint graph and no records).
    ``wrap(graph_module, "forward"|"backward", index)`` may edit the partitioned graphs before they run (the
    profiler wraps the nm nodes in ``record_function`` ranges).
    """
    counter = counter if counter is not None else GraphCounter()

    def backend(gm: fx.GraphModule, example_inputs):
        entry = CapturedGraph(counter.next())
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

        joint_pass = NMJointPass.for_graph(config, example_inputs, decompose=False, records=records, graph=entry.index)
        return aot_eager(gm, example_inputs, joint_pass, on_joint=on_joint, on_graph=on_graph)

    return backend


@dataclasses.dataclass
class Run:
    """One captured training step: the model, its inputs, the options (and the config parsed from them),
    the captured graphs, the GemmRecords and the compiled model."""

    model: torch.nn.Module
    inputs: tuple
    options: dict
    config: NMConfig
    graphs: list
    records: list
    compiled: Any = None
    graph_breaks: list = dataclasses.field(default_factory=list)

    @functools.cached_property
    def report(self):
        from nmcompile.kept import annotate, recomputed
        from nmcompile.report import Report

        kept = [k for g in self.graphs for k in annotate(self.records, g.index, g.forward, g.backward)]
        again = [m for g in self.graphs if g.backward is not None for m in recomputed(g.backward)]
        return Report(list(self.records), self.config.as_dict(), graph_breaks=list(self.graph_breaks), kept=kept,
                      recomputed=again)


def records_by_node(run: Run, index: int) -> dict:
    """The records of graph ``index`` of ``run``, by the name of the GEMM node they describe."""
    return {r.node: r for r in run.records if r.graph == index}


def step(compiled, model: torch.nn.Module, inputs: tuple) -> None:
    """One forward + backward; gradients are dropped afterwards."""
    reduce_output(compiled(*inputs)).backward()
    for p in model.parameters():
        p.grad = None


def run_step(compiled, model: torch.nn.Module, inputs: tuple) -> None:
    """``step``, with a failure of the model raised as a one-line ModelRunError."""
    try:
        step(compiled, model, inputs)
    except Exception as err:
        raise ModelRunError(f"the model failed to run: {type(err).__name__}: {one_line(err)}") from err


def run_captured(model: torch.nn.Module, inputs: tuple, options: dict, wrap=None, *,
                 config: Optional[NMConfig] = None) -> Run:
    """Compile with the capturing backend and run one forward + backward. ``config``: ``options`` already
    parsed (``NMConfig.from_options(options)[0]``), so they are not parsed again."""
    import torch._functorch.config as functorch_config

    if config is None:
        config, _ = NMConfig.from_options(options)
    torch._dynamo.reset()
    graphs: list = []
    records: list = []
    backend = capture_backend(config, graphs, records, wrap)
    compiled = torch.compile(model, backend=backend)
    with functorch_config.patch(enable_autograd_cache=False), collecting() as breaks:
        run_step(compiled, model, inputs)
    return Run(model, inputs, options, config, graphs, records, compiled, breaks)

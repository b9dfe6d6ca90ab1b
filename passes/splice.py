"""Insert a traced Python function into an FX graph, carrying the metadata of the node it serves."""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
import torch.fx as fx
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils.checkpoint import CheckpointPolicy

from .records import NodeInfo

# Metadata Inductor and the partitioner read, copied from the GEMM onto every node inserted for it.
CARRIED_META = (
    "stack_trace",
    "nn_module_stack",
    "fwd_nn_module_stack",
    "fwd_source_fn_stack",
    "seq_nr",
    "partitioner_tag",
)
RANDOM_OPS = {torch.ops.aten.randint.low}  # the seed draws (kernels.random.draw_seed)


@contextlib.contextmanager
def atomic(graph: fx.Graph):
    """Nodes inserted into ``graph`` inside the block are erased again if it raises.

    The rewrite of one GEMM inserts its nodes first and changes existing nodes only in its last
    steps (replacing an input, re-pointing users), so a failure leaves the graph exactly as it was."""
    before = set(graph.nodes)
    try:
        yield
    except BaseException:
        for node in reversed(list(graph.nodes)):  # users before the nodes they use
            if node not in before:
                graph.erase_node(node)
        raise


def trace(fn: Callable, inputs: Sequence[fx.Node], decompositions: dict) -> fx.GraphModule:
    """Trace ``fn`` on the fake values of ``inputs`` (symbolic sizes stay symbolic)."""
    fakes = [node.meta["val"] for node in inputs]
    mode = detect_fake_mode(fakes)
    with mode if mode is not None else contextlib.nullcontext(), enable_python_dispatcher():
        return make_fx(fn, decompositions, tracing_mode="real")(*fakes)


def splice(
    graph: fx.Graph,
    before: fx.Node,
    fn: Callable,
    inputs: Sequence[fx.Node],
    *,
    serves: fx.Node,
    info: NodeInfo,
    decompositions: dict,
    recompute: bool = False,
):
    """Insert ``fn(*inputs)`` just before ``before``; returns the node holding its result (a tuple
    of nodes for a tuple of tensors).

    Inserted nodes carry ``serves``' stack trace, module stack, seq_nr and partitioner tag, plus
    ``meta["nm"] = info``. Random ops serving a backward node are forced into the backward graph,
    so the partitioner never saves uniforms as activations. With ``recompute`` the inserted nodes are
    tagged for the partitioner to recompute in the backward rather than save (the tag of activation
    checkpointing's policies), so what the backward keeps is ``inputs``.
    """
    sub = trace(fn, inputs, decompositions)
    env: dict = {}
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    env.update(zip(placeholders, inputs))
    backward = serves.meta.get("partitioner_tag") == "is_backward"
    result = None
    with graph.inserting_before(before):
        for node in sub.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                result = fx.map_arg(node.args[0], lambda n: env[n])
                break
            new = graph.node_copy(node, lambda n: env[n])
            for key in CARRIED_META:
                if key in serves.meta:
                    new.meta[key] = serves.meta[key]
            if backward and node.target in RANDOM_OPS:
                new.meta["partitioner_tag"] = "must_be_in_backward"
            if recompute:
                new.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
            info.write(new)
            env[node] = new
    assert isinstance(result, fx.Node) or all(isinstance(r, fx.Node) for r in result), (
        "spliced functions return tensors"
    )
    return result

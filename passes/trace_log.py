"""TORCH_TRACE artifacts for tlparse: what the nm pass did, logged inside the compile that ran it.

``trace_structured`` attributes an artifact to the current compile id, so tlparse lists the nm
artifacts of a graph next to Inductor's own (``aot_joint_graph``, ``inductor_output_code``, ...).
Torch's trace log always has a handler (one that discards records unless ``TORCH_TRACE`` named a
directory), so ``trace_structured`` alone would build every payload: without ``TORCH_TRACE`` nothing
here is built or logged.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import torch.fx as fx
from torch._logging import trace_structured

JOINT_GRAPH = "nmcompile_joint_graph"  # the joint graph after the rewrite, as code
REWRITES = "nmcompile_rewrites"  # that graph's GemmRecords, as JSON
REPORT = "nmcompile_report"  # a whole run's report (the CLI)


def tracing() -> bool:
    """``TORCH_TRACE`` is set: the switch torch reads for its structured-trace logs."""
    return bool(os.environ.get("TORCH_TRACE"))


def log_artifact(name: str, encoding: str, payload_fn: Callable[[], str]) -> bool:
    """Log one artifact when tracing; True when logged."""
    if not tracing():
        return False
    trace_structured("artifact", metadata_fn=lambda: {"name": name, "encoding": encoding}, payload_fn=payload_fn)
    return True


def log_rewrite(graph: fx.Graph, records: list) -> None:
    """The rewritten joint graph and its GEMM records."""
    log_artifact(JOINT_GRAPH, "string", lambda: _code(graph))
    log_artifact(REWRITES, "json", lambda: json.dumps([r.as_dict() for r in records], indent=1))


def _code(graph: fx.Graph) -> str:
    module = graph.owning_module
    if module is not None:  # regenerated from the graph, so no recompile of Inductor's module is needed
        return module.print_readable(print_output=False)
    return graph.python_code("self").src

"""The ``nm`` torch.compile backend.

Registered through the ``torch_dynamo_backends`` entry point, so ``backend="nm"`` works without
importing nmcompile. Importing this module registers nothing (Dynamo registers the entry point's
function itself and would reject a second registration of the same name).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Optional

import torch

from nmcompile.passes import NMConfig, NMJointPass
from nmcompile.passes.joint_pass import chain_with_existing

_recorder: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("nm_records", default=None)


@contextlib.contextmanager
def recording():
    """Collect the GemmRecords of every graph the nm backend compiles inside this block."""
    records: list = []
    token = _recorder.set(records)
    try:
        yield records
    finally:
        _recorder.reset(token)


def nm_backend(gm: torch.fx.GraphModule, example_inputs, *, mode: Optional[str] = None,
               options: Optional[dict] = None, **_ignored):
    """Compile ``gm`` with Inductor (or aot_eager) plus the nm joint-graph pass."""
    config, inductor_patches = NMConfig.from_options(options)
    if not config.is_noop:
        from nmcompile.kernels import cpu

        cpu.prebuild()  # the nm ops' CPU kernels compile while Inductor works (once per machine)
    records = _recorder.get()
    # Dynamo calls the backend once per graph: number graphs across calls within one recording.
    first = 1 + max((r.graph for r in records), default=-1) if records is not None else 0
    if config.inner == "aot_eager":
        return _aot_eager(gm, example_inputs, NMJointPass(config, decompose=False, records=records, first_graph=first))
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = dict(list_mode_options(mode)) if mode and mode != "default" else {}
    patches.update(inductor_patches)
    import torch._inductor.config as inductor_config

    existing = patches.get("joint_custom_pre_pass", inductor_config.joint_custom_pre_pass)
    ours = NMJointPass(config, decompose=True, records=records, first_graph=first)
    patches["joint_custom_pre_pass"] = chain_with_existing(existing, ours)
    compiled = compile_fx(gm, example_inputs, config_patches=patches)
    if records is not None and ours.calls == 0 and torch.is_grad_enabled():
        # Inductor's caches served this graph, so the pass did not run on it: trace it once more,
        # without Inductor, to record what the cached code does (only while recording).
        _aot_eager(gm, example_inputs, NMJointPass(config, decompose=True, records=records, first_graph=first))
    return compiled


def _aot_eager(gm, example_inputs, joint_pass: NMJointPass):
    """AOTAutograd with the same decompositions as Inductor, the pass applied to the joint graph
    before partitioning, and eager execution of the resulting graphs."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    import torch._inductor.lowering  # noqa: F401  (some decompositions, e.g. max_pool2d's, read it)
    from torch._inductor.decomposition import select_decomp_table

    def partition(joint: torch.fx.GraphModule, joint_inputs, **kwargs):
        joint_pass(joint.graph)
        joint.recompile()
        return min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)

    def run_eagerly(graph: torch.fx.GraphModule, _inputs):
        return make_boxed_func(graph.forward)

    return aot_autograd(fw_compiler=run_eagerly, bw_compiler=run_eagerly, partition_fn=partition,
                        decompositions=select_decomp_table())(gm, example_inputs)

"""The ``nm`` torch.compile backend.

Registered through the ``torch_dynamo_backends`` entry point, so ``backend="nm"`` works without
importing nmcompile. Importing this module registers nothing (Dynamo registers the entry point's
function itself and would reject a second registration of the same name).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import json
import sys
from typing import Callable, Optional

import torch

from nmcompile.passes.config import Inner, NMConfig
from nmcompile.passes.joint_pass import NMJointPass
from nmcompile.recipes import ENV_OPTIONS, environment_options
from nmcompile.passes.joint_pass import chain_with_existing
from nmcompile.passes.saved import partition_then_compress


class GraphCounter:
    """Numbers the Dynamo graphs one compile context sees: 0, 1, ... in the order Dynamo compiles them,
    inference-only graphs included (each backend call is one graph, rewritten or not).

    The one numbering of the package: ``GemmRecord.graph`` (through ``NMJointPass(graph=...)``), the CLI's
    captured graphs, the noise monitor's ``GemmNoise.graph`` and the profiler's ``g<graph>`` ranges all take
    their index from a GraphCounter: ``recording()`` holds one, ``nmcompile.capture.capture_backend`` and
    ``NoiseMonitor`` one each."""

    def __init__(self) -> None:
        self.count = 0  # graphs numbered so far

    def next(self) -> int:
        """The index of the graph the backend is compiling now."""
        self.count += 1
        return self.count - 1


@dataclasses.dataclass
class _Recording:
    records: list
    graphs: GraphCounter = dataclasses.field(default_factory=GraphCounter)
    kept: list = dataclasses.field(default_factory=list)  # saved tensors no backward GEMM needs (nmcompile.kept)
    recomputed: list = dataclasses.field(default_factory=list)  # forward GEMMs the backwards run again

    def partitioned(self, index: int, forward: torch.fx.GraphModule, backward: torch.fx.GraphModule) -> None:
        """Read what graph ``index``'s backward keeps into its records (``GemmRecord.kept``) and here."""
        from nmcompile.kept import annotate, recomputed

        self.kept.extend(annotate(self.records, index, forward, backward))
        self.recomputed.extend(m for m in recomputed(backward) if m not in self.recomputed)


_recorder: contextvars.ContextVar[Optional[_Recording]] = contextvars.ContextVar("nm_recording", default=None)


@contextlib.contextmanager
def recording():
    """Collect the GemmRecords of every graph the nm backend compiles inside this block.

    ``GemmRecord.graph`` is the index of the Dynamo graph within the block (0, 1, ... in the order
    Dynamo compiles them, inference-only graphs included), the same numbering the CLI's captured
    graphs use."""
    state = _Recording([])
    token = _recorder.set(state)
    try:
        yield state.records
    finally:
        _recorder.reset(token)


def recorded_kept() -> tuple:
    """(kept, recomputed) of the innermost ``recording()`` so far: the saved tensors no backward GEMM needs and the
    forward GEMMs the backwards recompute (``nmcompile.kept``); ([], []) outside one."""
    state = _recorder.get()
    return (list(state.kept), list(state.recomputed)) if state is not None else ([], [])


_announced: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("nm_env_announced", default=None)


def resolve_options(options: Optional[dict]) -> tuple:
    """``NMConfig.from_options`` of ``options`` on top of those in ``NMCOMPILE_OPTIONS`` (said once on stderr,
    and named in errors); returns the config and the Inductor settings among the options."""
    env = environment_options()
    if env and env != _announced.get():  # once per distinct environment options: nothing silent
        _announced.set(env)
        print(f"nmcompile: backend options from {ENV_OPTIONS}: {json.dumps(env)}"
              + (f", under those given to torch.compile: {json.dumps(options)}" if options else ""), file=sys.stderr)
    try:
        return NMConfig.from_options({**env, **(options or {})})
    except ValueError as err:
        if not env:
            raise
        raise ValueError(f"{err} (options from {ENV_OPTIONS}={json.dumps(env)} under {json.dumps(options or {})})") \
            from None


def nm_backend(gm: torch.fx.GraphModule, example_inputs, *, mode: Optional[str] = None,
               options: Optional[dict] = None, **_ignored):
    """Compile ``gm`` with Inductor (or aot_eager) plus the nm joint-graph pass. ``options`` go on top of
    those in the ``NMCOMPILE_OPTIONS`` environment variable (for frameworks that pass a backend name only)."""
    config, inductor_patches = resolve_options(options)
    if not config.is_noop:
        from nmcompile.kernels import cpu

        cpu.prebuild()  # the nm ops' CPU kernels compile while Inductor works (once per machine)
    state = _recorder.get()
    records = state.records if state is not None else None
    index = state.graphs.next() if state is not None else 0
    partitioned = functools.partial(state.partitioned, index) if state is not None else None
    if config.inner == Inner.AOT_EAGER:
        return aot_eager(gm, example_inputs,
                         NMJointPass.for_graph(config, example_inputs, decompose=False, records=records, graph=index),
                         on_partitioned=partitioned)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = dict(list_mode_options(mode)) if mode and mode != "default" else {}
    patches.update(inductor_patches)
    ours = NMJointPass.for_graph(config, example_inputs, decompose=True, records=records, graph=index)
    patches["joint_custom_pre_pass"] = chain_with_existing(
        patches.get("joint_custom_pre_pass", _users_joint_pass()), ours
    )
    import torch._inductor.config as inductor_config

    # Reading what is kept from Inductor's partition makes the graph uncacheable, so it is done only where caches
    # are off anyway (explain); a compile served from the caches is read from the aot_eager trace below.
    reading = partitioned if patches.get("force_disable_caches", inductor_config.force_disable_caches) else None
    if (reading is not None or config.saved_int8) and torch.is_grad_enabled():
        patches["custom_partitioner_fn"] = _Partitioner(
            patches.get("custom_partitioner_fn", inductor_config.custom_partitioner_fn), config.saved_int8,
            reading)
    compiled = compile_fx(gm, example_inputs, config_patches=patches)
    if records is not None and ours.calls == 0 and torch.is_grad_enabled():
        # Inductor's caches served this graph, so the pass did not run on it: trace it once more,
        # without Inductor, to record what the cached code does (only while recording).
        aot_eager(gm, example_inputs, NMJointPass(config, decompose=True, records=records, graph=index,
                                                       ends=ours.ends), on_partitioned=partitioned)
    return compiled


def _partitioner_base():
    from torch._inductor.custom_graph_pass import CustomPartitionerFn

    return CustomPartitionerFn


class _Partitioner(_partitioner_base()):
    """Inductor's partitioner (the user's custom one, else the min-cut one), then on the graphs it made the
    ``saved_int8`` option (``passes.saved``) and, while recording, ``on_partitioned(forward, backward)``, so that
    ``explain`` reports what is kept."""

    def __init__(self, inner, saved_int8: bool, on_partitioned: Optional[Callable]) -> None:
        self.inner, self.saved_int8, self.on_partitioned = inner, saved_int8, on_partitioned

    def __call__(self, gm, joint_inputs, **kwargs):
        from functorch.compile import min_cut_rematerialization_partition

        partition = self.inner or min_cut_rematerialization_partition
        return partition_then_compress(partition, self.saved_int8, self.on_partitioned)(gm, joint_inputs, **kwargs)

    def __getstate__(self):  # Inductor pickles its config into the cache key: what the compiled code depends on
        return {"uuid": self.uuid()}

    def __deepcopy__(self, memo):  # torch 2.11 copies its config (get_config_copy): the copy must still partition,
        return self  # which one rebuilt from __getstate__ cannot (it is immutable, so sharing it is safe)

    __copy__ = lambda self: self  # noqa: E731

    def uuid(self):
        if self.on_partitioned is not None:  # no caching: a cached graph would skip the reading (recording
            # compiles afresh anyway)
            return None
        from torch._inductor.custom_graph_pass import get_hash_for_files

        import nmcompile.passes.saved as saved

        inner = self.inner.uuid() if self.inner is not None else "min-cut"
        return (get_hash_for_files((saved.__file__,)), self.saved_int8, inner)


def _users_joint_pass():
    import torch._inductor.config as inductor_config

    return inductor_config.joint_custom_pre_pass


def aot_eager(
    gm,
    example_inputs,
    joint_pass: NMJointPass,
    *,
    on_joint: Optional[Callable[[torch.fx.GraphModule, str], None]] = None,
    on_graph: Optional[Callable[[torch.fx.GraphModule, str], Optional[Callable]]] = None,
    on_partitioned: Optional[Callable[[torch.fx.GraphModule, torch.fx.GraphModule], None]] = None,
):
    """AOTAutograd with Inductor's decompositions, the user's joint pass and ours applied to the joint
    graph before partitioning (as under Inductor), and eager execution of the resulting graphs.

    ``on_joint(joint, "before" | "after")`` sees the joint graph around the passes, ``on_graph(graph,
    "forward" | "backward")`` each partitioned graph before it runs (the CLI keeps and wraps them); when it
    returns a callable, that runs instead of ``graph.forward`` (the noise monitor interprets the backward);
    ``on_partitioned(forward, backward)`` sees the two graphs the partitioner made (after ``saved_int8``'s change)."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    import torch._inductor.lowering  # noqa: F401  (some decompositions, e.g. max_pool2d's, read it)
    from torch._inductor.decomposition import select_decomp_table

    passes = chain_with_existing(_users_joint_pass(), joint_pass)

    def partition(joint: torch.fx.GraphModule, joint_inputs, **kwargs):
        if on_joint is not None:
            on_joint(joint, "before")
        passes(joint.graph)
        joint.recompile()
        if on_joint is not None:
            on_joint(joint, "after")
        return partition_then_compress(min_cut_rematerialization_partition, joint_pass.config.saved_int8,
                                       on_partitioned)(joint, joint_inputs, **kwargs)

    def compiler(kind: str):
        def run_eagerly(graph: torch.fx.GraphModule, _inputs):
            runner = on_graph(graph, kind) if on_graph is not None else None
            return make_boxed_func(runner if runner is not None else graph.forward)

        return run_eagerly

    return aot_autograd(
        fw_compiler=compiler("forward"),
        bw_compiler=compiler("backward"),
        partition_fn=partition,
        decompositions=select_decomp_table(),
    )(gm, example_inputs)

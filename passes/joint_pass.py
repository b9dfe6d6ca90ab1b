"""NMJointPass: the Inductor ``joint_custom_pre_pass`` that applies an NMConfig."""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import pkgutil
from typing import Optional

import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from nmcompile.kernels import timing
from nmcompile.kernels.gemm import kernel_choice_key

from .config import NMConfig
from .ends import ModelEnds, find_model_ends
from .rewrite import rewrite_joint_graph
from .roles import parameter_inputs
from .trace_log import log_rewrite

# The code whose behaviour a cached compile depends on: every module of these packages, wherever they are installed
_HASHED_PACKAGES = ("nmcompile.passes", "nmcompile.kernels")


@functools.lru_cache(maxsize=None)
def source_hash() -> str:
    """sha256 over the source of every module in ``nmcompile.passes`` and ``nmcompile.kernels`` (found through
    the import system, not the folder layout) and the C++ source of the CPU kernels."""
    digest = hashlib.sha256()
    for package_name in _HASHED_PACKAGES:
        package = importlib.import_module(package_name)
        names = [package_name] + sorted(
            info.name for info in pkgutil.walk_packages(package.__path__, prefix=f"{package_name}.")
        )
        for name in names:
            spec = importlib.util.find_spec(name)
            if spec is None or spec.origin is None or spec.loader is None:
                continue
            digest.update(name.encode())
            digest.update(spec.loader.get_data(spec.origin))
    from nmcompile.kernels.cpu import SOURCE

    digest.update(SOURCE.read_bytes())
    return digest.hexdigest()


class NMJointPass(CustomGraphPass):
    """Rewrites each joint graph it is given; appends what it did to ``records``.

    The nm ops are inserted as opaque ``torch.ops.nm.*`` calls either way (Inductor calls their
    precompiled kernels). ``decompose=True`` traces the inserted code (the seed draws) with
    Inductor's decomposition table, as Inductor will see it; ``False`` keeps plain aten ops
    (aot_eager, export). With ``TORCH_TRACE`` set, each rewritten graph and its records are logged
    for tlparse (``trace_log``).
    """

    def __init__(self, config: NMConfig, decompose: bool = True, records: Optional[list] = None, graph: int = 0,
                 ends: Optional[ModelEnds] = None, parameters: Optional[frozenset] = None):
        self.config = config
        self.ends = ends  # where the model's first and last layer are among the graph's inputs (keep_first_last)
        self.parameters = parameters  # which graph inputs are parameters (None: not known), for the GEMMs' roles
        self.decompose = decompose
        self.records = records if records is not None else []
        self.graph = graph  # the Dynamo graph's index (nmcompile.backend.GraphCounter): its records carry it
        self.calls = 0  # joint graphs rewritten (0 after a compile served from Inductor's caches)

    @classmethod
    def for_graph(cls, config: NMConfig, example_inputs, *, decompose: bool, records: Optional[list],
                  graph: int) -> "NMJointPass":
        """The pass for the Dynamo graph a backend is compiling now (with these ``example_inputs``): it also
        finds where the model's first and last layer are among them, for ``keep_first_last``, and which are
        parameters, for the GEMMs' roles."""
        ends = find_model_ends(example_inputs) if config.keep_first_last and config.fwd_quant else None
        return cls(config, decompose=decompose, records=records, graph=graph, ends=ends,
                   parameters=parameter_inputs(example_inputs))

    def __call__(self, graph: fx.Graph) -> None:
        self.calls += 1
        records = rewrite_joint_graph(graph, self.config, decompose=self.decompose, graph_index=self.graph,
                                      ends=self.ends, parameters=self.parameters)
        if records:  # inference graphs are left alone and give none
            log_rewrite(graph, records)
        self.records.extend(records)

    def uuid(self) -> str:
        # Sources, options, the kernels the lowering may choose here (tests' FP8 on CPU, this CPU's int8
        # support), which inputs are the model's first and last layer and, with dense_if_faster, whose measured
        # costs decided (the machine and thread count): Inductor's caches never serve code compiled under others.
        costs = timing.cache_file().name if self.config.dense_if_faster else None
        key = (f"{source_hash()}|{sorted(self.config.as_dict().items())}|decompose={self.decompose}"
               f"|kernels={kernel_choice_key()}|ends={self.ends}|costs={costs}"
               f"|parameters={sorted(self.parameters) if self.parameters is not None else None}")
        return hashlib.sha256(key.encode()).hexdigest()

    def __deepcopy__(self, memo):  # config patches may be copied; records must stay shared
        return self


class ChainedPass(CustomGraphPass):
    """Runs passes the user already configured (one pass, or a list on torch >= 2.13), then ours.

    Its uuid combines theirs; a plain callable without a uuid makes the chain uncacheable (uuid None),
    which is what Inductor does for such passes on its own.
    """

    def __init__(self, passes: list):
        self.passes = passes

    def __call__(self, graph: fx.Graph) -> None:
        for p in self.passes:
            p(graph)

    def uuid(self) -> Optional[str]:
        ids = [p.uuid() if isinstance(p, CustomGraphPass) else None for p in self.passes]
        if any(i is None for i in ids):
            return None
        return hashlib.sha256("|".join(map(str, ids)).encode()).hexdigest()


def chain_with_existing(existing, ours: NMJointPass) -> CustomGraphPass:
    if existing is None:
        return ours
    theirs = list(existing) if isinstance(existing, (list, tuple)) else [existing]
    return ChainedPass([*theirs, ours])

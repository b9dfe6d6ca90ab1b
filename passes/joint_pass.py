"""NMJointPass: the Inductor ``joint_custom_pre_pass`` that applies an NMConfig."""
from __future__ import annotations

import hashlib
import itertools
import pathlib
from typing import Optional

import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from .config import NMConfig
from .rewrite import rewrite_joint_graph

_SOURCES = sorted([*pathlib.Path(__file__).parent.glob("*.py"), *(pathlib.Path(__file__).parent.parent / "kernels").glob("*.py")])
_SOURCE_HASH = hashlib.sha256(b"".join(p.read_bytes() for p in _SOURCES)).hexdigest()


class NMJointPass(CustomGraphPass):
    """Rewrites each joint graph it is given; appends what it did to ``records``.

    ``decompose=True`` inlines the nm ops as aten math for Inductor to fuse; ``False`` keeps
    ``torch.ops.nm.*`` calls (readable graphs, eager execution, export).
    """

    def __init__(self, config: NMConfig, decompose: bool = True, records: Optional[list] = None, first_graph: int = 0):
        self.config = config
        self.decompose = decompose
        self.records = records if records is not None else []
        self._graphs = itertools.count(first_graph)

    def __call__(self, graph: fx.Graph) -> None:
        self.records.extend(rewrite_joint_graph(graph, self.config, decompose=self.decompose,
                                                graph_index=next(self._graphs)))

    def uuid(self) -> str:
        # Sources and options: Inductor's caches never serve code compiled under other options.
        key = f"{_SOURCE_HASH}|{sorted(self.config.as_dict().items())}|decompose={self.decompose}"
        return hashlib.sha256(key.encode()).hexdigest()

    def __deepcopy__(self, memo):  # config patches may be copied; records must stay shared
        return self

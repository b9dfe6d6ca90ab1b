"""The model's first and last layer, for ``keep_first_last``, wherever the model is cut into graphs.

Dynamo hands the backend one graph at a time: the whole model, one side of a graph break, one DDP bucket, or
one block of a model compiled block by block (torchtitan, ``layer.compile()`` loops). The model those graphs
belong to is the outermost ``nn.Module`` running on the Python stack when Dynamo compiles the graph; its layers
are the modules that own a weight of two or more dimensions (Linear, Conv, Embedding, ...), in the order the
model registers them (the order ``print(model)`` lists them). The first and last of those are kept in high
precision, whichever graph holds them; a graph that holds neither quantizes all its GEMMs. A transformer's
first layer is its token embedding, a lookup that no forward quantizer touches, so under per-block
compilation every block is quantized and only the LM head (outside the blocks) is kept.

A graph is matched to the model through its inputs: Dynamo passes a module's parameters to the graph as
inputs (the joint graph's primals, in the same order), so a GEMM is the first or last layer when its weight is
that layer's parameter.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Optional

import torch.nn as nn


@dataclasses.dataclass(frozen=True)
class ModelEnds:
    """The model a graph belongs to and where its first and last layers are among the graph's inputs."""

    model: str  # the model's class name
    first: str  # qualified name of its first layer within the model
    last: str
    inputs: tuple  # ((graph input index, ("first",) | ("last",) | ("first", "last")), ...): those layers' weights

    def roles(self, index: int) -> tuple:
        return dict(self.inputs).get(index, ())


def layers(model: nn.Module) -> list:
    """(qualified name, module) of the modules owning a weight of ≥ 2 dimensions, in registration order; the
    top module itself counts only when nothing below it owns one (a positional table on a ViT is not a layer)."""
    found = [(name, m) for name, m in model.named_modules()
             if any(p.dim() >= 2 for p in m.parameters(recurse=False))]
    below = [(name, m) for name, m in found if name]
    return below or found


def _modules_on_stack() -> list:
    """The nn.Modules whose methods are running, innermost first."""
    seen, out = set(), []
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
        if isinstance(owner, nn.Module) and id(owner) not in seen:
            seen.add(id(owner))
            out.append(owner)
        frame = frame.f_back
    return out


def find_model_ends(example_inputs) -> Optional[ModelEnds]:
    """Called by a backend while Dynamo compiles a graph with ``example_inputs``: the ends of the outermost
    module on the stack that owns one of the graph's parameters; None when there is none (a compiled
    function, or graphs given fake inputs), and the graph then keeps its own first and last GEMM."""
    params = {id(t): i for i, t in enumerate(example_inputs) if isinstance(t, nn.Parameter)}
    if not params:
        return None
    model = None
    for module in _modules_on_stack():
        if any(id(p) in params for p in module.parameters()):
            model = module  # keep going outward: the outermost owner is the model
    if model is None:
        return None
    model = _unwrapped(model)
    found = layers(model)
    if not found:
        return None
    (first, first_module), (last, last_module) = found[0], found[-1]
    roles: dict = {}
    for which, module in (("first", first_module), ("last", last_module)):
        for p in module.parameters(recurse=False):
            if p.dim() >= 2 and id(p) in params:
                roles[params[id(p)]] = roles.get(params[id(p)], ()) + (which,)
    return ModelEnds(type(model).__name__, first, last, tuple(sorted(roles.items())))


def _unwrapped(model: nn.Module) -> nn.Module:
    """The user's model inside torch.compile's OptimizedModule (its class names the model in records)."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model

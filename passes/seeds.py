"""One seed draw per graph, for Inductor: the nm ops' seeds as views of one ``nm.seeds`` call.

Each inserted op draws its seeds with ``torch.randint`` (kernels.random.draw_seed). Inductor
lowers every draw to a small kernel of its own, and each C++ kernel costs a compiler run: with LUQ
on both backward GEMMs of every layer that was most of the compile time of a transformer (a
lazily computed ``randint`` of all of them would still be recomputed per view). Merged, the graph
draws all its seeds at once from torch's generator, in the same order, so they are the values the
separate draws gave, and the ops read views of one buffer.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from .records import NodeInfo

aten = torch.ops.aten


def _is_seed_draw(node: fx.Node) -> bool:
    """A ``draw_seed`` the pass inserted: ``randint(0, 2**62, shape)`` of int64."""
    return (node.op == "call_function" and node.target is aten.randint.low and NodeInfo.read(node) is not None
            and tuple(node.args[:2]) == (0, 2**62) and node.kwargs.get("dtype", torch.int64) == torch.int64)


def merge_seed_draws(graph: fx.Graph) -> None:
    """Replace the nm seed draws of ``graph`` by slices of one draw placed before the first."""
    draws = [n for n in graph.nodes if _is_seed_draw(n)]
    if not draws or len({n.kwargs.get("device") for n in draws}) != 1:
        return  # nothing to draw, or draws on several devices
    sizes = [math.prod(n.args[2]) for n in draws]
    first = draws[0]
    fake = first.meta["val"]
    with fake.fake_mode:
        seeds_val = fake.new_empty((sum(sizes),))
    with graph.inserting_before(first):
        seeds = graph.call_function(torch.ops.nm.seeds.default, (sum(sizes), first.kwargs["device"]))
    seeds.meta.update(first.meta)
    seeds.meta["val"] = seeds_val
    NodeInfo(("seeds",), ",".join(NodeInfo.read(n).gemm for n in draws), count=len(draws)).write(seeds)
    offset = 0
    for draw, size in zip(draws, sizes):
        with graph.inserting_before(draw), fake.fake_mode:
            if len(draw.args[2]) == 0:  # a scalar seed
                part = graph.call_function(aten.select.int, (seeds, 0, offset))
                part.meta["val"] = seeds_val.select(0, offset)
            else:
                part = graph.call_function(aten.slice.Tensor, (seeds, 0, offset, offset + size))
                part.meta["val"] = seeds_val[offset : offset + size]
                if len(draw.args[2]) != 1:
                    part = graph.call_function(aten.view.default, (part, list(draw.args[2])))
                    part.meta["val"] = draw.meta["val"]
        for key, value in draw.meta.items():
            if key not in ("val", "tensor_meta"):
                part.meta.setdefault(key, value)
        draw.replace_all_uses_with(part)
        graph.erase_node(draw)
        offset += size

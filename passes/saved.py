"""The ``saved_int8`` option: an 8-bit copy of each activation the backward keeps that no int8 GEMM produced.

With ``recompute``, what the backward keeps of an int8 GEMM is its operands' codes, and its output is recomputed
exactly. What is left are the activations the elementwise backward reads: LayerNorm's normalized input, a dense
layer's input, the logits. With this option the forward hands the backward the codes of each such activation
instead (absmax8, one scale per row along the last dim, round to nearest: ``nm.absmax_int8``), and the backward
reads codes·scale in its place: 1 byte an element and one fp32 scale a row are kept, where 4 bytes were.

It changes the numbers: the backward's ops see a rounded copy, an error of at most half a level per element,
deterministic and so biased (measured in docs/results.md). That is why it is an option, off everywhere, the
``int8`` preset included, unlike the int8 GEMMs' recompute, which is exact and on in the preset. COAT stores such
activations in FP8 for the same reason; the int8 codes here are what the CPU kernels already make.

It works on the two graphs the partitioner made, so it changes exactly what is kept: each saved tensor becomes two
(codes and scales), in the forward's outputs and the backward's inputs alike (AOTAutograd reads the count from the
graphs it gets back). Left as they are: graph inputs and their views (parameters are kept anyway), per-row
statistics (last dim below ``MIN_ROW``), what the pass made (codes, scales, GEMM outputs), and the inputs of a
fused attention's backward (its log-sum-exp and output set every probability: a rounded copy is not a small error
there).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.fx as fx

from nmcompile.kernels.fp8 import dequantize

from .analysis import is_fused_attention_backward, is_tangent, layout_chain, module_path
from .records import NodeInfo
from .splice import splice

MIN_ROW = 16  # narrower rows are statistics (a LayerNorm's mean and rstd), not activations
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _wide_float(value) -> bool:
    return (isinstance(value, torch.Tensor) and value.dtype in _FLOATS and value.dim() >= 2
            and isinstance(value.shape[-1], int) and value.shape[-1] >= MIN_ROW)


def candidates(forward: fx.GraphModule, backward: fx.GraphModule) -> list:
    """[(the forward node saved, the backward's placeholder for it)] to be kept as int8 codes instead."""
    made = {n.name: n for n in forward.graph.nodes}
    found = []
    for placeholder in backward.graph.nodes:
        if placeholder.op != "placeholder" or is_tangent(placeholder):
            continue
        node = made.get(placeholder.name)
        if node is None or node.op != "call_function" or NodeInfo.read(node) is not None:
            continue
        base = layout_chain(node)[0]  # a view of a graph input (a parameter) is kept anyway
        if getattr(base, "op", None) == "placeholder" or not _wide_float(placeholder.meta.get("val")):
            continue
        if not any(is_fused_attention_backward(u) for u in placeholder.users):
            found.append((node, placeholder))
    return found


def compress_saved(forward: fx.GraphModule, backward: fx.GraphModule) -> list:
    """Keep every candidate as its int8 codes and per-row scales; returns the names of the forward nodes so kept."""
    from torch._inductor.decomposition import select_decomp_table

    decompositions = select_decomp_table()  # the graphs' own: Inductor's decompositions, under either compiler
    output = next(n for n in forward.graph.nodes if n.op == "output")
    first = next(n for n in backward.graph.nodes if n.op != "placeholder")
    done = []
    for node, placeholder in candidates(forward, backward):
        info = NodeInfo(("saved_int8",), node.name, module_path(node))
        last = node.meta["val"].dim() - 1
        codes, scale = splice(forward.graph, output, lambda x: torch.ops.nm.absmax_int8.default(x, 8, last), [node],
                              serves=node, info=info, decompositions=decompositions)
        outs = list(output.args[0])
        at = next(i for i, o in enumerate(outs) if o is node and i >= len(outs) - _saved_count(backward))
        output.args = (tuple(outs[:at] + [codes, scale] + outs[at + 1:]),)
        with backward.graph.inserting_before(placeholder):
            kept = [backward.graph.placeholder(n.name) for n in (codes, scale)]
        for new, made in zip(kept, (codes, scale)):
            new.meta["val"] = made.meta["val"]
        dtype = node.meta["val"].dtype
        copy = splice(backward.graph, first, lambda c, s: dequantize(c, s, dtype), kept, serves=placeholder,
                      info=info, decompositions=decompositions)
        placeholder.replace_all_uses_with(copy)
        backward.graph.erase_node(placeholder)
        done.append(node.name)
    if done:
        for gm in (forward, backward):
            gm.graph.lint()
            gm.recompile()
    return done


def _saved_count(backward: fx.GraphModule) -> int:
    return sum(1 for n in backward.graph.nodes if n.op == "placeholder" and not is_tangent(n))


def partition_then_compress(partition: Callable, enabled: bool,
                            on_partitioned: Optional[Callable] = None) -> Callable:
    """``partition`` (a partitioner: joint graph -> forward, backward), then ``compress_saved`` where ``enabled``,
    then ``on_partitioned(forward, backward)``."""
    def run(joint, joint_inputs, **kwargs):
        forward, backward = partition(joint, joint_inputs, **kwargs)
        if enabled:
            compress_saved(forward, backward)
        if on_partitioned is not None:
            on_partitioned(forward, backward)
        return forward, backward

    return run

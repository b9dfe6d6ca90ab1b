"""Kronecker-factor statistics captured inside the (compiled) training graph.

SINGD needs, per layer and on every T-th step, ``H_K = Π̂(Kᵀ āᵀā K)`` from the layer input
``a`` and ``H_C = Π̂(Cᵀ ĝᵀĝ C)`` from the gradient ``g`` w.r.t. the layer output. The official
package gets them from a forward hook that registers a tensor hook, which Dynamo cannot keep
in one graph. Here the optimizer instead rewires each supported layer's ``forward`` to pass
its output through :class:`KroneckerStatistics`, an autograd function that is the identity
on the output and, in backward, returns the two structured statistics as the *gradients* of
two zero "probe" tensors. Autograd (eager or AOTAutograd) then simply accumulates them into
``probe.grad``: no hooks, no side effects, one graph, and gradient accumulation over
micro-batches sums them exactly like the official accumulators.

The statistics are taken from the gradient arriving at the layer output, i.e. before any
rewrite that the ``nm`` backend applies to the operands of the backward GEMMs, and each is
one opaque custom op (``nm_singd::structured_gram``) so such passes cannot rewrite it either.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .structures import get_structure


@dataclass(frozen=True)
class LayerSpec:
    """Everything the statistics need to know about a layer, as plain constants."""

    kind: str  # "linear" or "conv2d"
    structure_K: str
    structure_C: str
    dim_K: int
    dim_C: int
    has_bias: bool
    loss_average: Optional[str]
    kfac_approx: str
    conv: Optional[Tuple] = None  # (kernel_size, stride, padding, dilation, groups)

    def as_tuple(self) -> tuple:
        # Dynamo traces autograd.Function.apply with constant tuples more reliably than
        # with arbitrary objects.
        return (self.kind, self.structure_K, self.structure_C, self.dim_K, self.dim_C,
                self.has_bias, self.loss_average, self.kfac_approx, self.conv)


def conv_padding(conv: nn.Conv2d) -> Tuple[int, int]:
    """Integer padding of a Conv2d; string padding only when it is symmetric."""
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    pads = []
    for k, d in zip(conv.kernel_size, conv.dilation):
        total = d * (k - 1)
        if total % 2:
            raise NotImplementedError(
                f"padding='same' with kernel_size={conv.kernel_size} and dilation="
                f"{conv.dilation} pads unequally; SINGD supports only symmetric padding"
            )
        pads.append(total // 2)
    return tuple(pads)


def layer_input_matrix(a: Tensor, spec: tuple) -> Tensor:
    """Rows ā_n of the input statistic āᵀā (bias column appended, 1/√N applied)."""
    kind, _, _, _, _, has_bias, _, kfac_approx, conv = spec
    if kind == "linear":
        if kfac_approx == "expand":
            rows = a.reshape(-1, a.shape[-1])
        else:
            rows = a.reshape(a.shape[0], -1, a.shape[-1]).mean(1)
    else:
        kernel, stride, padding, dilation, groups = conv
        batch, channels = a.shape[:2]
        # channel groups share the weight, so their patches are averaged
        a = a.reshape(batch, groups, channels // groups, *a.shape[2:]).mean(1)
        patches = F.unfold(a, kernel, dilation=dilation, padding=padding, stride=stride)
        if kfac_approx == "expand":
            rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        else:
            rows = patches.mean(2)
    if has_bias:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return rows / math.sqrt(rows.shape[0])


def output_grad_matrix(g: Tensor, spec: tuple) -> Tensor:
    """Rows ĝ_n of the output-gradient statistic ĝᵀĝ.

    A mean loss scales each per-sample gradient by 1/N; multiplying by √N turns ĝᵀĝ into
    the average of per-sample outer products, the KFAC scaling.
    """
    kind, _, _, _, _, _, loss_average, kfac_approx, _ = spec
    channel_last = g if kind == "linear" else g.movedim(1, -1)
    shared = channel_last.shape[1:-1].numel()  # weight-sharing positions per sample
    if loss_average is not None:
        terms = g.shape[0] * (shared if loss_average == "batch+sequence" else 1)
        channel_last = channel_last * math.sqrt(terms)
    if kfac_approx == "expand":
        return channel_last.reshape(-1, channel_last.shape[-1])
    return channel_last.reshape(g.shape[0], shared, channel_last.shape[-1]).sum(1)


@torch.library.custom_op("nm_singd::structured_gram", mutates_args=())
def structured_gram(rows: Tensor, factor: Tensor, structure: str, dim: int) -> Tensor:
    """Flat Π̂(Fᵀ rowsᵀ rows F) for the structured factor F stored in ``factor``.

    One opaque graph node on purpose: graph passes that rewrite backward GEMMs with one
    gradient operand (the ``nm`` backend compresses those) must not touch the statistics.
    """
    return get_structure(structure)(dim, factor).from_inner(rows.T).flat


@structured_gram.register_fake
def _structured_gram_shape(rows, factor, structure, dim):
    return factor.new_empty(get_structure(structure).numel(dim))


class KroneckerStatistics(torch.autograd.Function):
    """Identity on ``output``; backward delivers (H_K, H_C) as the probes' gradients."""

    @staticmethod
    def forward(ctx, output, layer_input, probe_K, probe_C, K_flat, C_flat, grad_unscale, spec):
        ctx.save_for_backward(layer_input, K_flat, C_flat, grad_unscale)
        ctx.spec = spec
        # a fresh tensor, so that in-place ops after the layer (ReLU(inplace=True)) work
        return output.clone()

    @staticmethod
    def backward(ctx, grad_output):
        layer_input, K_flat, C_flat, grad_unscale = ctx.saved_tensors
        spec = ctx.spec
        _, name_K, name_C, dim_K, dim_C = spec[:5]
        a = layer_input_matrix(layer_input.detach().to(K_flat.dtype), spec)
        g = output_grad_matrix(grad_output.detach().to(C_flat.dtype), spec)
        # divides by the previous step's GradScaler scale (1 without a scaler), see
        # SINGD._update_preconditioner for the rest of the un-scaling
        g = g * grad_unscale
        H_K = structured_gram(a, K_flat, name_K, dim_K)
        H_C = structured_gram(g, C_flat, name_C, dim_C)
        return grad_output, None, H_K, H_C, None, None, None, None


class StatisticsTap:
    """Per-layer state read by the rewired forward: probes, factors, and the on/off flag."""

    def __init__(self, spec: LayerSpec, K_flat: Tensor, C_flat: Tensor, grad_unscale: Tensor):
        self.spec = spec.as_tuple()
        self.K_flat, self.C_flat = K_flat, C_flat
        self.grad_unscale = grad_unscale
        self.grad_unscale_value = float(grad_unscale)
        self.probe_K = _probe_like(K_flat)
        self.probe_C = _probe_like(C_flat)
        # A Python bool, so Dynamo compiles one graph with and one without statistics.
        self.collect = True

    def attach(self, output: Tensor, layer_input: Tensor) -> Tensor:
        return KroneckerStatistics.apply(
            output, layer_input, self.probe_K, self.probe_C,
            self.K_flat, self.C_flat, self.grad_unscale, self.spec,
        )

    def take(self) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """The accumulated (H_K, H_C) flat tensors, resetting the accumulators."""
        stats = (self.probe_K.grad, self.probe_C.grad)
        self.probe_K.grad = None
        self.probe_C.grad = None
        return stats


def _probe_like(t: Tensor) -> Tensor:
    """A zero leaf shaped like ``t`` that costs one element (stride 0); only its .grad,
    which autograd materializes densely, takes memory, and only until ``take()``."""
    return torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape).requires_grad_()


def _forward_with_statistics(self: nn.Module, layer_input: Tensor, *args, **kwargs):
    tap: StatisticsTap = self._singd_tap
    output = tap.inner_forward(layer_input, *args, **kwargs)
    if tap.collect and torch.is_grad_enabled():
        output = tap.attach(output, layer_input)
    return output


class TapHandle:
    """Undoes :func:`install_tap` (same role as the official hook handles)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def remove(self) -> None:
        module = self.module
        if "_singd_tap" in module.__dict__:
            tap = module.__dict__.pop("_singd_tap")
            if tap.had_instance_forward:
                module.forward = tap.inner_forward
            else:
                module.__dict__.pop("forward", None)


def install_tap(module: nn.Module, tap: StatisticsTap) -> TapHandle:
    """Rewire ``module.forward`` so that its output carries the statistics."""
    if "_singd_tap" in module.__dict__:
        TapHandle(module).remove()  # a newer optimizer takes over the layer
    tap.had_instance_forward = "forward" in module.__dict__
    tap.inner_forward = module.forward
    module.__dict__["_singd_tap"] = tap
    module.forward = types.MethodType(_forward_with_statistics, module)
    return TapHandle(module)

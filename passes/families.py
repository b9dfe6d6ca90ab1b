"""The GEMM families the rewrite knows. Each family's module (matmul, conv, grouped) registers the targets it
handles here: its forward GEMM, seen by forward quantization (passes.forward), and its backward GEMMs, which it
rewrites itself. Adding a family is one new module that calls ``register``."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, Optional

import torch.fx as fx

if TYPE_CHECKING:
    from .context import RewriteContext


@dataclasses.dataclass(frozen=True)
class ForwardGemm:
    """What forward quantization needs to know of one forward GEMM."""

    shape: tuple  # (M, N, K), ints or symbolic sizes
    operands: tuple = ()  # (operand, the dim of it that holds K, or None for one scale per tensor)
    linear: bool = False  # a Linear layer's 2-D matmul: dense_if_faster may keep it dense
    unsupported: str = ""  # why forward quantization does not apply to this family, where it does not


@dataclasses.dataclass(frozen=True)
class GemmFamily:
    name: str
    label: Callable[[fx.Node], str]  # the records' op ("mm", "conv", "grouped_mm")
    is_forward: Callable[[fx.Node], bool]  # a node of the family's forward GEMM target
    is_backward: Callable[[fx.Node], bool]  # a node of one of its backward GEMM targets
    layer_operands: Callable[[fx.Node], tuple]  # a forward GEMM's operands whose sources tell its layer
    #                                             (keep_first_last)
    forward: Callable[[fx.Node], ForwardGemm]
    backward: Callable[["RewriteContext", fx.Node], None]  # rewrites one backward node, appending its records


FAMILIES: dict = {}


def register(family: GemmFamily) -> GemmFamily:
    if family.name in FAMILIES:
        raise ValueError(f"a GEMM family named {family.name!r} is already registered (families: {list(FAMILIES)})")
    FAMILIES[family.name] = family
    return family


def forward_family(node: fx.Node) -> Optional[GemmFamily]:
    return next((f for f in FAMILIES.values() if f.is_forward(node)), None)


def backward_family(node: fx.Node) -> Optional[GemmFamily]:
    return next((f for f in FAMILIES.values() if f.is_backward(node)), None)

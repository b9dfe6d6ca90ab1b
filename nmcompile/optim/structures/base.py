"""The interface every preconditioner structure implements.

A structured d×d matrix keeps all its free entries in ONE flat tensor (``.flat``); the
named parts (blocks, diagonals, ...) are views into it. One flat tensor per matrix keeps
the generic operations (add, scale, all-reduce, checkpointing) structure-agnostic, lets the
compiled training graph read a factor as a single input, and lets a structured statistic
travel through autograd as the gradient of one flat probe tensor.
"""

from __future__ import annotations

import math
from typing import ClassVar, List, Optional, Sequence, Tuple

import torch
from torch import Tensor


class StructuredMatrix:
    """A square matrix with a fixed sparsity/parameter-sharing pattern.

    Subclasses define :meth:`part_shapes` and the linear algebra below. The projection
    :meth:`from_dense` maps a *symmetric* dense matrix onto the structure (SINGD's Π̂):
    entries that the structure stores only once for a symmetric pair are doubled.
    """

    name: ClassVar[str]

    def __init__(self, dim: int, flat: Tensor):
        expected = self.numel(dim)
        if flat.ndim != 1 or flat.numel() != expected:
            raise ValueError(
                f"{type(self).__name__} of dim {dim} needs a flat tensor with "
                f"{expected} entries, got shape {tuple(flat.shape)}"
            )
        self.dim = dim
        self.flat = flat

    # --- layout -------------------------------------------------------------------
    @classmethod
    def part_shapes(cls, dim: int) -> List[Tuple[int, ...]]:
        """Shapes of the stored parts, in storage order."""
        raise NotImplementedError

    @classmethod
    def numel(cls, dim: int) -> int:
        return sum(math.prod(s) for s in cls.part_shapes(dim))

    def parts(self) -> List[Tensor]:
        shapes = self.part_shapes(self.dim)
        chunks = self.flat.split([math.prod(s) for s in shapes])
        return [c.view(s) for c, s in zip(chunks, shapes)]

    @classmethod
    def from_parts(cls, dim: int, parts: Sequence[Tensor]) -> "StructuredMatrix":
        return cls(dim, torch.cat([p.reshape(-1) for p in parts]))

    # --- constructors -------------------------------------------------------------
    @classmethod
    def zeros(cls, dim: int, dtype=None, device=None) -> "StructuredMatrix":
        return cls(dim, torch.zeros(cls.numel(dim), dtype=dtype, device=device))

    @classmethod
    def eye(cls, dim: int, dtype=None, device=None) -> "StructuredMatrix":
        return cls.zeros(dim, dtype=dtype, device=device).diag_add_(1.0)

    @classmethod
    def from_dense(cls, sym: Tensor) -> "StructuredMatrix":
        """Π̂(sym): project a symmetric dense matrix onto the structure."""
        raise NotImplementedError

    @classmethod
    def project_outer(cls, S: Tensor) -> "StructuredMatrix":
        """Π̂(S Sᵀ); subclasses avoid forming the dense d×d product where they can."""
        return cls.from_dense(S @ S.T)

    # --- linear algebra -----------------------------------------------------------
    def to_dense(self) -> Tensor:
        raise NotImplementedError

    def matmul(self, X: Tensor) -> Tensor:
        """self @ X for a dense X with ``dim`` rows."""
        raise NotImplementedError

    def rmatmat(self, X: Tensor) -> Tensor:
        """selfᵀ @ X for a dense X with ``dim`` rows."""
        raise NotImplementedError

    def __matmul__(self, other: "StructuredMatrix") -> "StructuredMatrix":
        """Product of two matrices of this structure (the structure is closed under it)."""
        raise NotImplementedError

    def from_inner(self, X: Optional[Tensor] = None) -> "StructuredMatrix":
        """Π̂(selfᵀ X Xᵀ self), with X = I when omitted (then Π̂(selfᵀ self))."""
        S = self.rmatmat(X) if X is not None else self.to_dense().T
        return self.project_outer(S)

    def diagonal(self) -> Tensor:
        raise NotImplementedError

    def average_trace(self) -> Tensor:
        return self.diagonal().mean()

    def diag_add_(self, value: float) -> "StructuredMatrix":
        raise NotImplementedError

    # --- generic, via the flat storage ----------------------------------------------
    def add_(self, other: "StructuredMatrix", alpha=1.0) -> "StructuredMatrix":
        self._check_compatible(other)
        if isinstance(alpha, Tensor):
            self.flat.add_(other.flat * alpha)
        else:
            self.flat.add_(other.flat, alpha=alpha)
        return self

    def mul_(self, value) -> "StructuredMatrix":
        self.flat.mul_(value)
        return self

    def clone(self) -> "StructuredMatrix":
        return type(self)(self.dim, self.flat.clone())

    def infinity_norm(self) -> Tensor:
        """Largest absolute stored entry (used by ``normalize_lr_cov``)."""
        return self.flat.abs().max()

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.dim, self.dim))

    @property
    def dtype(self) -> torch.dtype:
        return self.flat.dtype

    def _check_compatible(self, other: "StructuredMatrix") -> None:
        if type(other) is not type(self) or other.dim != self.dim:
            raise ValueError(
                f"cannot combine {type(self).__name__}(dim={self.dim}) with "
                f"{type(other).__name__}(dim={other.dim})"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, dtype={self.flat.dtype})"


def add_to_diagonal_(mat: Tensor, value: float) -> Tensor:
    """In-place ``mat += value * I`` for a square matrix or a batch of them."""
    mat.diagonal(dim1=-2, dim2=-1).add_(value)
    return mat


def all_diagonal_sums(mat: Tensor) -> Tensor:
    """Sums of every diagonal of a square matrix, index k+d-1 for offset k = j - i."""
    d = mat.shape[0]
    idx = torch.arange(d, device=mat.device)
    offsets = (idx.unsqueeze(0) - idx.unsqueeze(1) + d - 1).reshape(-1)
    out = torch.zeros(2 * d - 1, dtype=mat.dtype, device=mat.device)
    return out.index_add_(0, offsets, mat.reshape(-1))


__all__: List[str] = ["StructuredMatrix", "add_to_diagonal_", "all_diagonal_sums"]

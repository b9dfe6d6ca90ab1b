"""Diagonal factor: d stored entries, every operation is elementwise."""

from __future__ import annotations

from .base import StructuredMatrix


class DiagonalMatrix(StructuredMatrix):
    name = "diagonal"

    @classmethod
    def part_shapes(cls, dim):
        return [(dim,)]

    @classmethod
    def from_dense(cls, sym):
        return cls(sym.shape[0], sym.diagonal().clone())

    @classmethod
    def project_outer(cls, S):
        return cls(S.shape[0], (S * S).sum(1))

    def to_dense(self):
        return self.flat.diag()

    def matmul(self, X):
        return self.flat.unsqueeze(1) * X

    rmatmat = matmul  # a diagonal matrix is its own transpose

    def __matmul__(self, other):
        self._check_compatible(other)
        return DiagonalMatrix(self.dim, self.flat * other.flat)

    def from_inner(self, X=None):
        sq = self.flat * self.flat
        if X is not None:
            sq = sq * (X * X).sum(1)
        return DiagonalMatrix(self.dim, sq)

    def diagonal(self):
        return self.flat

    def diag_add_(self, value):
        self.flat.add_(value)
        return self

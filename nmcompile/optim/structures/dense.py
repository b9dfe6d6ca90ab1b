"""Unstructured d×d factor: the original (inverse-free) KFAC preconditioner."""

from __future__ import annotations

from torch import Tensor

from .base import StructuredMatrix, add_to_diagonal_


class DenseMatrix(StructuredMatrix):
    name = "dense"

    @classmethod
    def part_shapes(cls, dim):
        return [(dim, dim)]

    @property
    def mat(self) -> Tensor:
        return self.flat.view(self.dim, self.dim)

    @classmethod
    def from_dense(cls, sym):
        return cls(sym.shape[0], sym.reshape(-1).clone())

    @classmethod
    def project_outer(cls, S):
        return cls(S.shape[0], (S @ S.T).reshape(-1))

    def to_dense(self):
        return self.mat.clone()

    def matmul(self, X):
        return self.mat @ X

    def rmatmat(self, X):
        return self.mat.T @ X

    def __matmul__(self, other):
        self._check_compatible(other)
        return DenseMatrix(self.dim, (self.mat @ other.mat).reshape(-1))

    def from_inner(self, X=None):
        S = self.mat.T if X is None else self.rmatmat(X)
        return self.project_outer(S)

    def diagonal(self):
        return self.mat.diagonal()

    def diag_add_(self, value):
        add_to_diagonal_(self.mat, value)
        return self

"""Hierarchical factor: dense corners, a diagonal middle and dense coupling strips.

Rows and columns are split into sizes (k1, m, k2)::

    [ A  B_m  B_e ]    A: k1×k1, B = [B_m | B_e]: k1×(m+k2)
    [ 0  c    0   ]    c: the m diagonal entries
    [ 0  D    E   ]    D: k2×m, E: k2×k2

Products of such matrices keep the pattern (upper block-triangular), which SINGD needs.
"""

from __future__ import annotations

import torch

from .base import StructuredMatrix, add_to_diagonal_


class HierarchicalMatrix(StructuredMatrix):
    MAX_K1: int
    MAX_K2: int

    @classmethod
    def _sizes(cls, dim):
        """(k1, m, k2); small dims fill A first, then E, then the diagonal."""
        k1 = min(dim, cls.MAX_K1)
        k2 = min(dim - k1, cls.MAX_K2)
        return k1, dim - k1 - k2, k2

    @classmethod
    def part_shapes(cls, dim):
        k1, m, k2 = cls._sizes(dim)
        return [(k1, k1), (k1, m + k2), (m,), (k2, m), (k2, k2)]

    def _split_rows(self, X):
        return X.split(list(self._sizes(self.dim)))

    @classmethod
    def from_dense(cls, sym):
        dim = sym.shape[0]
        k1, m, k2 = cls._sizes(dim)
        A = sym[:k1, :k1]
        B = 2 * sym[:k1, k1:]
        c = sym.diagonal()[k1 : k1 + m]
        D = 2 * sym[k1 + m :, k1 : k1 + m]
        E = sym[k1 + m :, k1 + m :]
        return cls.from_parts(dim, [A, B, c, D, E])

    @classmethod
    def project_outer(cls, S):
        dim = S.shape[0]
        S_a, S_m, S_e = S.split(list(cls._sizes(dim)))
        A = S_a @ S_a.T
        B = 2 * S_a @ torch.cat([S_m, S_e]).T
        c = (S_m * S_m).sum(1)
        D = 2 * S_e @ S_m.T
        E = S_e @ S_e.T
        return cls.from_parts(dim, [A, B, c, D, E])

    def to_dense(self):
        A, B, c, D, E = self.parts()
        k1, m, k2 = self._sizes(self.dim)
        out = self.flat.new_zeros(self.dim, self.dim)
        out[:k1, :k1] = A
        out[:k1, k1:] = B
        mid = torch.arange(k1, k1 + m, device=out.device)
        out[mid, mid] = c
        out[k1 + m :, k1 : k1 + m] = D
        out[k1 + m :, k1 + m :] = E
        return out

    def matmul(self, X):
        A, B, c, D, E = self.parts()
        X_a, X_m, X_e = self._split_rows(X)
        top = A @ X_a + B @ torch.cat([X_m, X_e])
        return torch.cat([top, c.unsqueeze(1) * X_m, D @ X_m + E @ X_e])

    def rmatmat(self, X):
        A, B, c, D, E = self.parts()
        k1, m, k2 = self._sizes(self.dim)
        B_m, B_e = B.split([m, k2], dim=1)
        X_a, X_m, X_e = self._split_rows(X)
        middle = B_m.T @ X_a + c.unsqueeze(1) * X_m + D.T @ X_e
        return torch.cat([A.T @ X_a, middle, B_e.T @ X_a + E.T @ X_e])

    def __matmul__(self, other):
        self._check_compatible(other)
        A1, B1, c1, D1, E1 = self.parts()
        A2, B2, c2, D2, E2 = other.parts()
        k1, m, k2 = self._sizes(self.dim)
        B1_m, B1_e = B1.split([m, k2], dim=1)
        B = A1 @ B2 + torch.cat([B1_m * c2 + B1_e @ D2, B1_e @ E2], dim=1)
        parts = [A1 @ A2, B, c1 * c2, D1 * c2 + E1 @ D2, E1 @ E2]
        return type(self).from_parts(self.dim, parts)

    def from_inner(self, X=None):
        if X is not None:
            return self.project_outer(self.rmatmat(X))
        A, B, c, D, E = self.parts()
        k1, m, k2 = self._sizes(self.dim)
        B_m, B_e = B.split([m, k2], dim=1)
        parts = [
            A.T @ A,
            2 * A.T @ B,
            c * c + (B_m * B_m).sum(0) + (D * D).sum(0),
            2 * (B_e.T @ B_m + E.T @ D),
            B_e.T @ B_e + E.T @ E,
        ]
        return type(self).from_parts(self.dim, parts)

    def diagonal(self):
        A, _, c, _, E = self.parts()
        return torch.cat([A.diagonal(), c, E.diagonal()])

    def diag_add_(self, value):
        A, _, c, _, E = self.parts()
        add_to_diagonal_(A, value)
        c.add_(value)
        add_to_diagonal_(E, value)
        return self


class Hierarchical15_15Matrix(HierarchicalMatrix):
    name = "hierarchical15_15"
    MAX_K1 = 15
    MAX_K2 = 15

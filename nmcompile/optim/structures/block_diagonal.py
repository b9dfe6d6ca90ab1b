"""Block-diagonal factor: dense b×b blocks on the diagonal plus one smaller last block."""

from __future__ import annotations

import torch

from .base import StructuredMatrix, add_to_diagonal_


class BlockDiagonalMatrix(StructuredMatrix):
    """``dim = n·b + r``: n full blocks of size b (``BLOCK``) and a remainder r < b."""

    BLOCK: int

    @classmethod
    def _sizes(cls, dim):
        return divmod(dim, cls.BLOCK)

    @classmethod
    def part_shapes(cls, dim):
        n, r = cls._sizes(dim)
        return [(n, cls.BLOCK, cls.BLOCK), (r, r)]

    def _split_rows(self, X):
        """Rows of X grouped by block: ([n, b, cols], [r, cols])."""
        n, r = self._sizes(self.dim)
        head, tail = X.split([n * self.BLOCK, r])
        return head.reshape(n, self.BLOCK, X.shape[1]), tail

    @classmethod
    def from_dense(cls, sym):
        dim = sym.shape[0]
        n, r = cls._sizes(dim)
        head = sym[: n * cls.BLOCK, : n * cls.BLOCK].reshape(n, cls.BLOCK, n, cls.BLOCK)
        idx = torch.arange(n, device=sym.device)
        blocks = head[idx, :, idx, :]
        return cls.from_parts(dim, [blocks, sym[n * cls.BLOCK :, n * cls.BLOCK :]])

    @classmethod
    def project_outer(cls, S):
        dim = S.shape[0]
        n, r = cls._sizes(dim)
        head, tail = S.split([n * cls.BLOCK, r])
        head = head.reshape(n, cls.BLOCK, S.shape[1])
        return cls.from_parts(dim, [head @ head.transpose(1, 2), tail @ tail.T])

    def to_dense(self):
        blocks, last = self.parts()
        return torch.block_diag(*blocks.unbind(0), last)

    def matmul(self, X):
        blocks, last = self.parts()
        head, tail = self._split_rows(X)
        n = blocks.shape[0]
        return torch.cat([(blocks @ head).reshape(n * self.BLOCK, X.shape[1]), last @ tail])

    def rmatmat(self, X):
        blocks, last = self.parts()
        head, tail = self._split_rows(X)
        n = blocks.shape[0]
        out = (blocks.transpose(1, 2) @ head).reshape(n * self.BLOCK, X.shape[1])
        return torch.cat([out, last.T @ tail])

    def __matmul__(self, other):
        self._check_compatible(other)
        (b1, l1), (b2, l2) = self.parts(), other.parts()
        return type(self).from_parts(self.dim, [b1 @ b2, l1 @ l2])

    def from_inner(self, X=None):
        if X is not None:
            return self.project_outer(self.rmatmat(X))
        blocks, last = self.parts()
        return type(self).from_parts(
            self.dim, [blocks.transpose(1, 2) @ blocks, last.T @ last]
        )

    def diagonal(self):
        blocks, last = self.parts()
        return torch.cat([blocks.diagonal(dim1=1, dim2=2).reshape(-1), last.diagonal()])

    def diag_add_(self, value):
        blocks, last = self.parts()
        add_to_diagonal_(blocks, value)
        add_to_diagonal_(last, value)
        return self


class Block30DiagonalMatrix(BlockDiagonalMatrix):
    name = "block30diagonal"
    BLOCK = 30

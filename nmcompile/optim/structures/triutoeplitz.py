"""Upper-triangular Toeplitz factor: d stored entries, the first row.

``U[i, j] = r[j - i]`` for j ≥ i, i.e. the transpose of the lower-triangular Toeplitz
matrix with the same coefficients, so it reuses that file's convolution helpers.
"""

from __future__ import annotations

from .triltoeplitz import TrilToeplitzMatrix, lower_toeplitz_matmul, upper_toeplitz_matmul


class TriuToeplitzMatrix(TrilToeplitzMatrix):
    name = "triutoeplitz"

    def to_dense(self):
        return super().to_dense().T

    def matmul(self, X):
        return upper_toeplitz_matmul(self.flat, X)

    def rmatmat(self, X):
        return lower_toeplitz_matmul(self.flat, X)

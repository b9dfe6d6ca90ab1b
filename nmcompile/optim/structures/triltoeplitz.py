"""Lower-triangular Toeplitz factor: d stored entries, the first column.

``L[i, j] = c[i - j]`` for i ≥ j. Multiplying by L is a causal 1-d convolution along the
rows, so matmuls cost O(d²·cols) time but only O(d) storage for the factor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import StructuredMatrix, all_diagonal_sums


def lower_toeplitz_matmul(coeffs, X):
    """``L @ X`` with ``L[i, j] = coeffs[i - j]`` (i ≥ j)."""
    d = X.shape[0]
    signals = F.pad(X.T.unsqueeze(1), (d - 1, 0))  # each column is a signal
    out = F.conv1d(signals, coeffs.flip(0).view(1, 1, d).to(X.dtype))
    return out.squeeze(1).T


def upper_toeplitz_matmul(coeffs, X):
    """``U @ X`` with ``U[i, j] = coeffs[j - i]`` (j ≥ i)."""
    d = X.shape[0]
    signals = F.pad(X.T.unsqueeze(1), (0, d - 1))
    out = F.conv1d(signals, coeffs.view(1, 1, d).to(X.dtype))
    return out.squeeze(1).T


def toeplitz_projection(diag_sums_lower, diag_sums_upper, dim):
    """Π̂ onto triangular Toeplitz: mean of the main diagonal, and for offset k the
    lower plus upper k-th diagonal sums divided by their length d - k."""
    lengths = torch.arange(dim, 0, -1, dtype=diag_sums_lower.dtype, device=diag_sums_lower.device)
    coeffs = diag_sums_lower + diag_sums_upper
    coeffs[0] = diag_sums_lower[0]
    return coeffs / lengths


class TrilToeplitzMatrix(StructuredMatrix):
    name = "triltoeplitz"

    @classmethod
    def part_shapes(cls, dim):
        return [(dim,)]

    @classmethod
    def from_dense(cls, sym):
        d = sym.shape[0]
        sums = all_diagonal_sums(sym)  # index d-1+k holds offset k = j - i
        lower = sums[: d].flip(0)  # offsets 0, -1, ..., -(d-1)
        upper = sums[d - 1 :]  # offsets 0, 1, ..., d-1
        return cls(d, toeplitz_projection(lower, upper, d))

    @classmethod
    def project_outer(cls, S):
        # The k-th diagonal sum of S Sᵀ is the lag-k autocorrelation of S's rows, summed
        # over columns: one conv1d, no d×d temporary.
        d, n = S.shape
        lags = F.conv1d(F.pad(S.T.unsqueeze(0), (0, d - 1)), S.T.unsqueeze(0))
        lags = lags.reshape(d)
        return cls(d, toeplitz_projection(lags, lags, d))

    def from_inner(self, X=None):
        if X is not None:
            return self.project_outer(self.rmatmat(X))
        # Π̂(LᵀL) without the d×d matrix: its lag-m diagonal sum is
        # Σ_{t≥m} (d - t)·c[t]·c[t-m] (the same for Π̂(UUᵀ) of the upper orientation).
        c, d = self.flat, self.dim
        weighted = c * torch.arange(d, 0, -1, dtype=c.dtype, device=c.device)
        lags = F.conv1d(F.pad(weighted.view(1, 1, d), (0, d - 1)), c.view(1, 1, d)).reshape(d)
        return type(self)(d, toeplitz_projection(lags, lags, d))

    def to_dense(self):
        i = torch.arange(self.dim, device=self.flat.device)
        offset = i.unsqueeze(1) - i.unsqueeze(0)
        return torch.where(offset >= 0, self.flat[offset.clamp(min=0)], 0.0).to(self.flat.dtype)

    def matmul(self, X):
        return lower_toeplitz_matmul(self.flat, X)

    def rmatmat(self, X):
        return upper_toeplitz_matmul(self.flat, X)

    def __matmul__(self, other):
        # Triangular Toeplitz matrices of one orientation commute; the product's
        # coefficients are the truncated convolution of both coefficient vectors.
        self._check_compatible(other)
        coeffs = lower_toeplitz_matmul(self.flat, other.flat.unsqueeze(1)).squeeze(1)
        return type(self)(self.dim, coeffs)

    def diagonal(self):
        return self.flat[:1].expand(self.dim)

    def average_trace(self):
        return self.flat[0]

    def diag_add_(self, value):
        self.flat[0].add_(value)
        return self

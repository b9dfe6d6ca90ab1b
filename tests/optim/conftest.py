"""Fixtures for the SINGD tests: the official reference implementation.

The reference is the official ``singd==0.0.5`` package. Its block-diagonal structure has a
transposition bug (``rmatmat`` computes ``K @ X`` instead of ``Kᵀ @ X`` and
``from_inner()`` gives ``Π̂(K Kᵀ)`` instead of ``Π̂(Kᵀ K)``), visible as soon as K stops
being symmetric, i.e. from the second preconditioner update on. ``reference_singd``
returns the official optimizer with exactly those two methods corrected, so that parity
tests compare the same mathematics; ``test_singd.py::test_upstream_block_diagonal_bug``
pins the bug itself.
"""

from __future__ import annotations

import pytest
import torch


try:
    from singd.optim.optimizer import SINGD as OfficialSINGD
    from singd.structures.blockdiagonal import BlockDiagonalMatrixTemplate
except ImportError:  # the structure tests do not need the reference
    OfficialSINGD = None


@pytest.fixture(autouse=True)
def single_thread():
    """These tensors are tiny: extra threads only add contention on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _fixed_rmatmat(self, mat):
    return type(self)(self._blocks.transpose(1, 2), self._last.T) @ mat


def _fixed_from_inner(self, X=None):
    if X is None:
        return type(self)(self._blocks.transpose(1, 2) @ self._blocks, self._last.T @ self._last)
    return self.from_mat_inner(self.rmatmat(X))


@pytest.fixture
def reference_singd(monkeypatch):
    """The official SINGD class, with the block-diagonal transposition bug fixed."""
    if OfficialSINGD is None:
        pytest.skip("needs the reference package: pip install singd==0.0.5")
    monkeypatch.setattr(BlockDiagonalMatrixTemplate, "rmatmat", _fixed_rmatmat)
    monkeypatch.setattr(BlockDiagonalMatrixTemplate, "from_inner", _fixed_from_inner)
    return OfficialSINGD



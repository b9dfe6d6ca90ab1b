"""Every structure against its dense equivalent (float64, so any mismatch is a bug)."""

import math

import pytest
import torch

from nmcompile.optim.structures import STRUCTURES, get_structure

from singd_helpers import STRUCTURE_NAMES

# 1, 7: tiny; 15/16/30/31: the hierarchical and block boundaries; 46, 61: all parts present
DIMS = [1, 7, 15, 16, 30, 31, 46, 61]
D64 = dict(dtype=torch.float64)


def random_sym(d, gen):
    m = torch.randn(d, d, generator=gen, **D64)
    return m + m.T


def random_structured(cls, d, gen):
    """A generic, non-symmetric member: the product of two projections."""
    return cls.from_dense(random_sym(d, gen)) @ cls.from_dense(random_sym(d, gen))


@pytest.fixture(params=STRUCTURE_NAMES)
def cls(request):
    return STRUCTURES[request.param]


def test_registry_uses_official_names():
    assert sorted(STRUCTURES) == sorted(STRUCTURE_NAMES)
    for name, cls in STRUCTURES.items():
        assert cls.name == name and get_structure(name) is cls


def test_unknown_structure_error_lists_allowed_names():
    with pytest.raises(ValueError, match=r"'blockdiag'.*allowed.*'block30diagonal'"):
        get_structure("blockdiag")


@pytest.mark.parametrize("d", DIMS)
def test_ops_match_dense(cls, d):
    gen = torch.Generator().manual_seed(d)
    K = random_structured(cls, d, gen)
    Kd = K.to_dense()
    assert not (d > 1 and cls.name != "diagonal" and torch.allclose(Kd, Kd.T)), "want K ≠ Kᵀ"
    X = torch.randn(d, 5, generator=gen, **D64)
    project = lambda sym: cls.from_dense(sym).to_dense()  # noqa: E731

    torch.testing.assert_close(K.matmul(X), Kd @ X)
    torch.testing.assert_close(K.rmatmat(X), Kd.T @ X)
    other = random_structured(cls, d, gen)
    torch.testing.assert_close((K @ other).to_dense(), Kd @ other.to_dense())
    torch.testing.assert_close(K.from_inner(X).to_dense(), project(Kd.T @ X @ X.T @ Kd))
    torch.testing.assert_close(K.from_inner().to_dense(), project(Kd.T @ Kd))
    torch.testing.assert_close(cls.project_outer(X).to_dense(), project(X @ X.T))
    torch.testing.assert_close(K.average_trace(), Kd.trace() / d)
    torch.testing.assert_close(K.diagonal(), Kd.diagonal())

    # in-place ops act on the represented matrix
    torch.testing.assert_close(K.clone().diag_add_(0.5).to_dense(), Kd + 0.5 * torch.eye(d, **D64))
    torch.testing.assert_close(K.clone().mul_(-3.0).to_dense(), -3.0 * Kd)
    torch.testing.assert_close(K.clone().add_(other, alpha=2.0).to_dense(), Kd + 2 * other.to_dense())


@pytest.mark.parametrize("d", DIMS)
def test_projection(cls, d):
    """Π̂ keeps exactly the structure: entries outside the pattern are dropped, and a
    symmetric pair folds onto the stored triangle, so Π̂(A + Aᵀ) = 2A for A = Π̂(S)."""
    gen = torch.Generator().manual_seed(100 + d)
    A = cls.from_dense(random_sym(d, gen))
    Ad = A.to_dense()
    torch.testing.assert_close(cls.from_dense(Ad + Ad.T).to_dense(), 2 * Ad)
    # Π̂ preserves the trace (the SINGD update relies on tr(H) through average_trace)
    S = random_sym(d, gen)
    torch.testing.assert_close(cls.from_dense(S).average_trace(), S.trace() / d)
    torch.testing.assert_close(cls.eye(d, **D64).to_dense(), torch.eye(d, **D64))
    torch.testing.assert_close(cls.zeros(d, **D64).to_dense(), torch.zeros(d, d, **D64))


def test_projection_known_values():
    """Hand-checked entries for each structure on a 40×40 symmetric matrix."""
    d = 40
    S = torch.arange(d * d, **D64).reshape(d, d)
    S = S + S.T
    dense = STRUCTURES["dense"].from_dense(S).to_dense()
    assert torch.equal(dense, S)
    assert torch.equal(STRUCTURES["diagonal"].from_dense(S).to_dense(), torch.diag(S.diagonal()))
    block = STRUCTURES["block30diagonal"].from_dense(S).to_dense()
    assert torch.equal(block[:30, :30], S[:30, :30]) and torch.equal(block[30:, 30:], S[30:, 30:])
    assert block[:30, 30:].abs().sum() == 0 and block[30:, :30].abs().sum() == 0
    hier = STRUCTURES["hierarchical15_15"].from_dense(S).to_dense()
    assert torch.equal(hier[:15, :15], S[:15, :15])
    assert torch.equal(hier[:15, 15:], 2 * S[:15, 15:])  # folded from the lower triangle
    assert torch.equal(hier[15:25, 15:25], torch.diag(S.diagonal()[15:25]))
    assert torch.equal(hier[25:, 15:25], 2 * S[25:, 15:25])
    assert torch.equal(hier[25:, 25:], S[25:, 25:])
    assert hier[15:, :15].abs().sum() == 0
    tril = STRUCTURES["triltoeplitz"].from_dense(S).to_dense()
    for k in (0, 1, 7, d - 1):
        expected = S.diagonal(-k).mean() * (1 if k == 0 else 2)
        torch.testing.assert_close(tril.diagonal(-k), expected.expand(d - k))
    triu = STRUCTURES["triutoeplitz"].from_dense(S).to_dense()
    torch.testing.assert_close(triu, tril.T)


def test_storage_is_structured():
    """Stored floats per d×d factor: what makes SINGD memory-efficient."""
    d = 769
    n = {name: cls.numel(d) for name, cls in STRUCTURES.items()}
    assert n["dense"] == d * d
    assert n["diagonal"] == n["triltoeplitz"] == n["triutoeplitz"] == d
    assert n["block30diagonal"] == (d // 30) * 900 + (d % 30) ** 2
    assert n["hierarchical15_15"] == 15 * 15 * 2 + 15 * (d - 15) + (d - 30) + 15 * (d - 30)


def test_flat_storage_is_shared_with_parts():
    """In-place ops must write through to the flat tensor the compiled graph reads."""
    cls = STRUCTURES["hierarchical15_15"]
    M = cls.eye(40, **D64)
    flat = M.flat
    M.diag_add_(1.0).add_(cls.eye(40, **D64), alpha=2.0)
    assert M.flat is flat
    torch.testing.assert_close(M.to_dense(), 4 * torch.eye(40, **D64))


def test_wrong_flat_size_is_rejected(cls):
    with pytest.raises(ValueError, match="needs a flat tensor"):
        cls(10, torch.zeros(cls.numel(10) + 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_ops_close_to_float64(cls, dtype):
    d = 46
    gen = torch.Generator().manual_seed(7)
    K64 = random_structured(cls, d, gen)
    X = torch.randn(d, 8, generator=gen, **D64)
    K = type(K64)(d, K64.flat.to(dtype))
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    scale = (K64.to_dense().T @ X).norm()
    assert (K.rmatmat(X.to(dtype)).double() - K64.rmatmat(X)).norm() / scale < tol
    H = K.from_inner(X.to(dtype))
    assert H.flat.dtype == dtype and torch.isfinite(H.flat).all()
    trace_tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert math.isclose(float(H.average_trace()), float(K64.from_inner(X).average_trace()), rel_tol=trace_tol)

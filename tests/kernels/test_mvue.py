import pytest
import torch

import nmcompile
from nmcompile.kernels import reference as ref
from nmcompile.kernels.grouping import split_groups, uniform_shape
from tests.conftest import heavy_tailed
from tests.kernels.stats import max_z, variance_z

PATTERNS = [(1, 2), (2, 4), (1, 4), (3, 8)]


def draws(x, n, m, dim, count):
    """``count`` independent draws at once: copies stacked on a new leading dim."""
    dim = dim % x.dim() + 1
    return nmcompile.mvue(x.expand(count, *x.shape).contiguous(), f"{n}:{m}", dim=dim)


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_structure_and_matches_reference(n, m, dim):
    x = heavy_tailed(16, 16, 24, seed=n * 10 + m)  # every dim holds at least 2 groups of M <= 8
    u = torch.rand(uniform_shape(x.shape, m, dim))
    y = torch.ops.nm.mvue(x, u, n, m, dim % 3)
    body, tail = split_groups(y, m, dim)
    assert body.numel() > 0
    assert ((body != 0).sum(-1) <= n).all()
    xb, _ = split_groups(x, m, dim)
    # groups with at least N nonzeros keep exactly N
    assert ((body != 0).sum(-1)[(xb != 0).sum(-1) >= n] == n).all()
    torch.testing.assert_close(y, ref.mvue_reference(x, u, n, m, dim % 3), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,m", PATTERNS)
def test_unbiased_within_five_standard_errors(n, m):
    x = heavy_tailed(32, 8 * m, seed=1)
    samples = draws(x, n, m, -1, 4000)
    var = ref.mvue_variance(split_groups(x, m, -1)[0], n).reshape(x.shape)
    assert max_z(samples, x, var) < 5


@pytest.mark.parametrize("n,m", PATTERNS)
def test_group_variance_is_the_exact_mvue_variance(n, m):
    x = heavy_tailed(16, 4 * m, seed=2)
    samples = split_groups(draws(x, n, m, -1, 4000), m, -1)[0]  # [S, 16, G, M]
    exact = ref.mvue_variance(split_groups(x, m, -1)[0], n).sum(-1)
    assert variance_z(samples, exact) < 5


def test_greedy_fails_the_same_unbiasedness_test():
    x = heavy_tailed(32, 32, seed=1)
    samples = torch.stack([nmcompile.greedy(x, "2:4") for _ in range(50)])
    var = ref.mvue_variance(split_groups(x, 4, -1)[0], 2).reshape(x.shape)
    assert max_z(samples, x, var * 50 / 4000) > 5  # the MVUE test's bound at 4000 draws


def test_special_cases_from_the_paper():
    # 1:2 keeps a with probability |a|/(|a|+|b|) and writes sign(a)(|a|+|b|)
    x = torch.tensor([[3.0, -1.0]])
    assert torch.ops.nm.mvue(x, torch.tensor([[0.5]]), 1, 2, 1).tolist() == [[4.0, 0.0]]
    assert torch.ops.nm.mvue(x, torch.tensor([[0.8]]), 1, 2, 1).tolist() == [[0.0, -4.0]]
    # 2:4 with max <= S/2: every kept value is sign(x)·S/2
    x = torch.tensor([[1.0, -2.0, 3.0, 2.0]])
    y = torch.ops.nm.mvue(x, torch.tensor([[0.3]]), 2, 4, 1)
    assert sorted(y[y != 0].abs().tolist()) == [4.0, 4.0]
    # a dominant element (> sum of the rest) is kept exactly, always
    x = torch.tensor([[10.0, 1.0, 2.0, 1.0]])
    for u in (0.0, 0.4, 0.99):
        y = torch.ops.nm.mvue(x, torch.tensor([[u]]), 2, 4, 1)
        assert y[0, 0] == 10.0 and (y != 0).sum() == 2 and y[0, 1:].abs().sum() == 4.0


def test_zero_and_sparse_groups_are_returned_unchanged():
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 1.5, 0.0, 0.0, -2.0]])
    for _ in range(10):
        assert torch.equal(nmcompile.mvue(x, "2:4"), x)


def test_remainder_stays_dense():
    x = heavy_tailed(4, 10, seed=3)
    y = nmcompile.mvue(x, "2:4")
    assert torch.equal(y[:, 8:], x[:, 8:])
    assert ((y[:, :8].reshape(4, 2, 4) != 0).sum(-1) <= 2).all()
    short = heavy_tailed(4, 3)
    assert torch.equal(nmcompile.mvue(short, "2:4"), short)


def test_non_finite_groups_propagate():
    x = heavy_tailed(2, 8, seed=4)
    x[0, 1] = float("nan")
    x[1, 6] = float("inf")
    y = nmcompile.mvue(x, "2:4")
    assert y[0, :4].isnan().any() and y[1, 4:].isinf().any()
    assert torch.isfinite(y[0, 4:]).all() and ((y[0, 4:] != 0).sum() <= 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_fp32_math(dtype):
    x = heavy_tailed(8, 32, seed=5).clamp(-1e3, 1e3).to(dtype)
    u = torch.rand(8, 8)
    y = torch.ops.nm.mvue(x, u, 2, 4, 1)
    assert y.dtype == dtype
    assert torch.equal(y, torch.ops.nm.mvue(x.float(), u, 2, 4, 1).to(dtype))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="pattern='3:2'"):
        nmcompile.mvue(torch.randn(4, 4), "3:2")
    with pytest.raises(ValueError, match="dim=5"):
        nmcompile.mvue(torch.randn(4, 4), "2:4", dim=5)
    with pytest.raises(ValueError, match="floating-point"):
        nmcompile.mvue(torch.ones(4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="uniforms have shape"):
        torch.ops.nm.mvue(torch.randn(4, 8), torch.rand(4, 3), 2, 4, 1)


def test_greedy_keeps_the_largest():
    x = torch.tensor([[0.1, -5.0, 3.0, 0.2, 1.0, 1.0, 1.0, 0.0]])
    assert nmcompile.greedy(x, "2:4").tolist() == [[0.0, -5.0, 3.0, 0.0, 1.0, 1.0, 0.0, 0.0]]
    y = nmcompile.greedy(heavy_tailed(24, 6), "3:8", dim=0)  # 3 groups of 8 along dim 0
    assert not torch.equal(y, heavy_tailed(24, 6))
    torch.testing.assert_close(y, ref.greedy_reference(heavy_tailed(24, 6), 3, 8, 0))

"""The counter-based uniforms: distribution, independence of neighbours, reproducibility."""
import torch

from nmcompile.kernels.random import draw_seed, uniform

N = 1 << 20


def test_uniform_moments_within_five_standard_errors():
    u = uniform(torch.tensor(123456789012345), (N,), "cpu").double()
    assert u.min() >= 0 and u.max() < 1
    # mean 1/2 (sd of the mean sqrt(1/12/N)), variance 1/12 (sd of the sample variance sqrt(1/180/N))
    assert abs(u.mean() - 0.5) < 5 * (1 / 12 / N) ** 0.5
    assert abs(u.var() - 1 / 12) < 5 * (1 / 180 / N) ** 0.5
    # equal-width histogram: counts are binomial
    counts = torch.histc(u, bins=64, min=0, max=1)
    expected = N / 64
    assert ((counts - expected).abs() < 5 * (expected * (1 - 1 / 64)) ** 0.5).all()


def test_neighbours_and_seeds_are_uncorrelated():
    u = uniform(torch.tensor(42), (N,), "cpu").double() - 0.5
    v = uniform(torch.tensor(43), (N,), "cpu").double() - 0.5
    bound = 5 / N**0.5  # the correlation of independent uniforms has sd 1/sqrt(N)
    assert abs((u[1:] * u[:-1]).mean() * 12) < bound
    assert abs((u * v).mean() * 12) < bound


def test_eager_and_compiled_are_bit_identical_and_seeded_by_torch():
    seed = torch.tensor(2**61 + 12345)
    assert torch.equal(uniform(seed, (37, 64), "cpu"), torch.compile(uniform)(seed, (37, 64), "cpu"))
    torch.manual_seed(7)
    a = uniform(draw_seed("cpu"), (100,), "cpu")
    torch.manual_seed(7)
    assert torch.equal(a, uniform(draw_seed("cpu"), (100,), "cpu"))
    assert not torch.equal(a, uniform(draw_seed("cpu"), (100,), "cpu"))

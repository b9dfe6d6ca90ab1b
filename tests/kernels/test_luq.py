import pytest
import torch

import nmcompile
from nmcompile.kernels import reference as ref
from nmcompile.kernels.luq import luq_levels
from tests.conftest import heavy_tailed
from tests.kernels.stats import max_z


def draws(x, count, bits=4, levels="strict", samples=1):
    return nmcompile.luq(x.expand(count, *x.shape).contiguous(), bits=bits, samples=samples, levels=levels)


@pytest.mark.parametrize("bits,levels", [(4, "strict"), (4, "reference"), (3, "strict"), (8, "strict")])
def test_outputs_are_zero_or_powers_of_two_of_alpha(bits, levels):
    x = heavy_tailed(64, 64, seed=bits)
    y = nmcompile.luq(x, bits=bits, levels=levels)
    L = luq_levels(bits, levels)
    alpha = x.abs().max() / 2.0 ** (L - 1)
    units = (y.abs() / alpha)[y != 0]
    k = torch.log2(units)
    assert torch.allclose(k, k.round(), atol=1e-5), "every nonzero is α·2^k"
    assert k.round().min() >= 0 and k.round().max() <= L - 1
    assert (torch.sign(y) * torch.sign(x) >= 0).all()
    if levels == "strict":
        assert L == 2 ** (bits - 1) - 1  # magnitudes + zero + sign fit in `bits`


def test_max_is_never_clipped():
    x = heavy_tailed(32, 32, seed=7)
    i = x.abs().argmax()
    for _ in range(20):
        y = nmcompile.luq(x)
        assert y.flatten()[i] == x.flatten()[i]
        assert y.abs().max() <= x.abs().max()


@pytest.mark.parametrize("levels", ["strict", "reference"])
def test_unbiased_within_five_standard_errors(levels):
    x = heavy_tailed(16, 32, seed=8)
    samples = draws(x, 4000, levels=levels)
    assert max_z(samples, x, ref.luq_variance(x, 4, levels)) < 5


def test_reference_agrees_on_the_same_uniforms():
    x = heavy_tailed(8, 40, seed=9)
    u = torch.rand(2, 8, 40)
    torch.testing.assert_close(torch.ops.nm.luq(x, u, 4, "strict"), ref.luq_reference(x, u, 4, "strict"))


@pytest.mark.parametrize("smp", [1, 2, 4])
def test_variance_is_exact_and_smp_divides_it(smp):
    x = heavy_tailed(16, 32, seed=10)
    n = 3000
    s = draws(x, n, samples=smp).double()
    exact = ref.luq_variance(x, 4, "strict", samples=smp).sum()
    dev2 = ((s - s.mean(0)) ** 2).sum((1, 2))  # per-draw total squared deviation
    se = dev2.std() / n**0.5
    assert abs(dev2.mean() - exact) < 5 * se + 1e-6 * exact
    assert exact > 0


def test_zero_and_non_finite():
    assert torch.equal(nmcompile.luq(torch.zeros(3, 4)), torch.zeros(3, 4))
    x = heavy_tailed(4, 4)
    x[1, 2] = float("nan")
    assert nmcompile.luq(x).isnan().all()
    x[1, 2] = float("inf")
    assert not torch.isfinite(nmcompile.luq(x)).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    x = heavy_tailed(8, 32, seed=11).clamp(-100, 100).to(dtype)
    u = torch.rand(1, 8, 32)
    y = torch.ops.nm.luq(x, u, 4, "strict")
    assert y.dtype == dtype and torch.equal(y, torch.ops.nm.luq(x.float(), u, 4, "strict").to(dtype))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="bits=9"):
        nmcompile.luq(torch.randn(3), bits=9)
    with pytest.raises(ValueError, match="levels='loose'"):
        nmcompile.luq(torch.randn(3), levels="loose")
    with pytest.raises(ValueError, match="samples=0"):
        nmcompile.luq(torch.randn(3), samples=0)

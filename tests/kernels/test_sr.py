"""nm.sr, uniform stochastic rounding (kernels/sr.py): kernels, reference, structure and statistics.

- the CPU kernel (nm_cpu.cpp, nm_sr) and the Triton kernel (cuda.sr, Triton's CPU interpreter without a
  GPU) give the bits of ``sr_math``, for every dtype, layout, explicit uniforms and seeds;
- ``sr_math`` agrees with a float64 / rational reference written here from the definition (explicit
  levels, scale by exact rational arithmetic), code for code;
- every output is an integer code times the per-tensor scale, exact in the dtype, nothing clipped;
- unbiasedness and the exact variance (v - lo)(lo + 1 - v)·scale²/samples, with bounds from theory
  (standard errors from the exact moments), and mutations (biased or wrong-variance quantizers) that
  those same checks must reject.
"""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from nmcompile.kernels import cpu, cuda, ops
from nmcompile.kernels.catalog import SR
from nmcompile.kernels import sr as sr_module
from nmcompile.kernels.random import uniform
from nmcompile.kernels.sawb import round_significand, scale_bits
from nmcompile.kernels.sr import round_up_significand, sr_levels, sr_math, sr_scale
from tests.conftest import heavy_tailed
from tests.kernels.stats import max_z, variance_z
from tests.kernels.test_cpu_kernels import layouts, same

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# max|x| per dtype: ordinary, large, small, and subnormal in the dtype (where the scale's quantum is
# the dtype's smallest subnormal)
AMAXES = {torch.float32: [1.0, 1e30, 1e-30, 1e-40, 1e-44], torch.bfloat16: [1.0, 1e30, 1e-30, 1e-39],
          torch.float16: [1.0, 1e3, 3e-5, 2e-7]}
PRECISION = {torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}
SMALLEST = {torch.float32: Fraction(1, 2**149), torch.bfloat16: Fraction(1, 2**133), torch.float16: Fraction(1, 2**24)}
FP32_MAX = Fraction(torch.finfo(torch.float32).max)

needs_cpu = pytest.mark.skipif(not cpu.available(), reason=f"CPU kernels not built: {cpu.failure()}")


# ---- the reference: the definition, in exact rational / float64 arithmetic ---------------------


def reference_scale(amax: float, dtype: torch.dtype, bits: int) -> Fraction:
    """The smallest k·q ≥ amax / L, q = max(2^(e - keep), the dtype's smallest subnormal) with
    2^(e-1) ≤ amax / L < 2^e and keep = max(p - bits, 1); capped at fp32's largest such value."""
    keep = max(PRECISION[dtype] - bits, 1)
    target = Fraction(amax) / sr_levels(bits)
    if target == 0:
        return Fraction(0)
    e = 0
    while Fraction(2) ** e <= target:
        e += 1
    while Fraction(2) ** (e - 1) > target:
        e -= 1
    q = max(Fraction(2) ** (e - keep), SMALLEST[dtype])
    scale = math.ceil(target / q) * q
    return min(scale, (2**keep - 1) * Fraction(2) ** (128 - keep))


def significant_bits(f: Fraction) -> int:
    """Bits of the odd part of a dyadic rational."""
    assert f.denominator & (f.denominator - 1) == 0, "dyadic"
    n = f.numerator
    while n and n % 2 == 0:
        n //= 2
    return n.bit_length()


def reference_codes(x: torch.Tensor, u: torch.Tensor, bits: int) -> tuple[torch.Tensor, float]:
    """Signed codes ``(samples, *x.shape)`` and the scale: explicit levels s·(0..L) in float64, the
    lower one by search, up iff u < (|x| - lo)/s, decided as lo + u·s < |x|. That comparison is exact
    in float64: u = j·2^-24 (j < 2^24) and s = k·q (k ≤ 2^keep), so lo + u·s is an integer below 2^48
    times q·2^-24 and |x| is exactly representable."""
    assert torch.equal(u.double() * 2**24, torch.floor(u.double() * 2**24)), "uniforms on the 2^-24 grid"
    a = x.double().abs()
    scale = float(reference_scale(a.max().item(), x.dtype, bits))  # exact: a dyadic with ≤ 24 bits
    L = sr_levels(bits)
    levels = scale * torch.arange(L + 1, dtype=torch.float64)
    lo = torch.searchsorted(levels, a, right=True) - 1  # the largest level ≤ |x|
    assert (lo <= L).all() and (levels[-1] >= a).all(), "nothing above the top level"
    up = levels[lo] + u.double() * scale < a
    return torch.sign(x.double()) * (lo + up), scale


def grid_uniforms(shape, seed: int) -> torch.Tensor:
    """float32 uniforms on the 2^-24 grid (what the kernels' hash produces), with the extremes."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 2**24, tuple(shape), generator=g).float() * 2.0**-24
    u.view(-1)[:2] = torch.tensor([0.0, 1 - 2**-24])[: u.numel()]
    return u


def exact_variance(x: torch.Tensor, bits: int, samples: int = 1) -> torch.Tensor:
    """(v - lo)(lo + 1 - v)·scale² / samples per element (float64, v = |x| / scale exactly)."""
    scale = float(reference_scale(x.double().abs().max().item(), x.dtype, bits))
    v = x.double().abs() / scale
    lo = torch.floor(v)
    return (v - lo) * (lo + 1 - v) * scale**2 / samples


def bernoulli_p(x: torch.Tensor, bits: int) -> torch.Tensor:
    scale = float(reference_scale(x.double().abs().max().item(), x.dtype, bits))
    v = x.double().abs() / scale
    return v - torch.floor(v)


def chi_square_z(draws: torch.Tensor, x: torch.Tensor, bits: int, samples: int) -> float:
    """Σ over elements of (mean - x)² / (var / n), standardized by its exact mean and variance.

    Each element's mean over n draws is s·(lo + B / N), B ~ Binomial(N = n·samples, p): its
    standardized square has mean 1 and variance 2 + (1 - 6pq) / (N·p·q) exactly (the binomial's
    fourth standardized moment is 3 + (1 - 6pq)/(Npq)); the elements are independent. Summed over
    the elements with N·min(p, q) ≥ 5 (the usual rule for the normal approximation: rarer events
    make single terms heavy-tailed; ``max_z`` checks those elements one by one)."""
    n = draws.shape[0]
    var = exact_variance(x, bits, samples)
    p = bernoulli_p(x, bits)
    keep = n * samples * torch.minimum(p, 1 - p) >= 5
    err = draws.double().mean(0) - x.double()
    stat = (err[keep] ** 2 / (var[keep] / n)).sum()
    pq = (p * (1 - p))[keep]
    spread = (2 + (1 - 6 * pq) / (n * samples * pq)).sum().sqrt()
    return ((stat - keep.sum()) / spread).item()


FIVE_SIGMA = 5.733e-7  # two-sided normal tail beyond 5 standard errors, 2·Φ(-5)


def frequent(x: torch.Tensor, bits: int, total: int) -> torch.Tensor:
    """Elements whose rarer rounding has an expected count of at least 5 over ``total`` uniforms:
    there the mean is close to normal (the usual rule), and 5 standard errors mean what they say."""
    p = bernoulli_p(x, bits)
    return total * torch.minimum(p, 1 - p) >= 5


def unbiased(draws: torch.Tensor, x: torch.Tensor, bits: int, samples: int) -> tuple[float, float]:
    """(max_z over the frequent elements, smallest exact binomial tail probability over the rare ones).

    With few expected events one event is already several standard errors away (1/sqrt(Np)), so the
    rare elements get the exact test: the number B of roundings up over N = n·samples uniforms is
    Binomial(N, p) with the exact p = v - lo; the one-sided tail on B's side must not be below 5σ's."""
    n = draws.shape[0]
    N = n * samples
    big = frequent(x, bits, N).flatten()
    var = exact_variance(x, bits, samples).flatten()
    z = max_z(draws.reshape(n, -1)[:, big], x.flatten()[big], var[big]) if big.any() else 0.0
    scale = float(reference_scale(x.double().abs().max().item(), x.dtype, bits))
    lo = torch.floor(x.double().abs() / scale).flatten()[~big]
    codes = (draws.reshape(n, -1)[:, ~big].double().abs() / scale * samples).sum(0)
    ups = torch.round(codes - N * lo)
    p = bernoulli_p(x, bits).flatten()[~big]
    rare_up = p <= 0.5  # count the rarer outcome: k events of probability r
    r = torch.where(rare_up, p, 1 - p)
    k = torch.where(rare_up, ups, N - ups)
    j = torch.arange(int(k.max().item()) + 200 if k.numel() else 1, dtype=torch.float64)[:, None]
    log_pmf = (torch.lgamma(torch.tensor(N + 1.0)) - torch.lgamma(j + 1) - torch.lgamma(N - j + 1)
               + torch.xlogy(j, r) + torch.xlogy(N - j, 1 - r))
    pmf = torch.where(j <= N, log_pmf.exp(), 0.0)
    upper = (pmf * (j >= k)).sum(0)
    lower = (pmf * (j <= k)).sum(0)
    tail = torch.minimum(upper, lower).min().item() if k.numel() else 1.0
    return z, tail


# ---- (a) the CPU kernel gives the bits of sr_math ----------------------------------------------


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("samples", [1, 2, 3])
def test_cpu_kernel_gives_the_bits_of_sr_math(dtype, bits, samples):
    for name, x, _ in layouts(dtype, seed=bits):
        finite = torch.nan_to_num(x, nan=0.0, posinf=0.0)  # a NaN/Inf anywhere makes all of SR non-finite
        for t in (x, finite, finite * 1e-38, finite * 1e-44, torch.zeros_like(x)):
            u = grid_uniforms((samples, *t.shape), seed=samples)
            y = torch.ops.nm.sr(t, u, bits)
            assert same(y, sr_math(t, u, bits)), name
            assert y.stride() == torch.empty_like(t).stride(), "output keeps x's layout (as the fake kernel says)"
            seeds = torch.tensor([7, 2**62 - 1, 12345][:samples])
            stacked = torch.stack([uniform(s, t.shape, "cpu") for s in seeds])
            assert same(torch.ops.nm.sr(t, seeds, bits), sr_math(t, stacked, bits)), name


@needs_cpu
def test_cpu_kernel_reads_uniforms_of_any_strides():
    x = torch.randn(8, 12, 16).transpose(0, 2)
    v = torch.rand(2, 8, 12, 16).permute(0, 3, 2, 1)  # (2, 16, 12, 8) through other strides
    assert not v.is_contiguous() and v.shape == (2, *x.shape)
    assert same(torch.ops.nm.sr(x, v, 4), sr_math(x, v.contiguous(), 4))
    assert same(torch.ops.nm.sr(x, v.double(), 4), sr_math(x, v.contiguous(), 4)), "float64 uniforms: as .float()"


@needs_cpu
def test_torch_math_fallback_gives_the_same_bits(monkeypatch):
    x = torch.randn(64, 48).t()
    seeds = torch.tensor([3, 4])
    fast = torch.ops.nm.sr(x, seeds, 4)
    monkeypatch.setattr(ops, "_on_cpu_kernels", lambda *a: False)
    slow = torch.ops.nm.sr(x, seeds, 4)
    assert same(fast, slow) and fast.stride() == slow.stride()


def test_opcheck_and_argument_checks():
    torch.library.opcheck(torch.ops.nm.sr.default, (torch.randn(5, 7), torch.rand(2, 5, 7), 4))
    torch.library.opcheck(torch.ops.nm.sr.default, (torch.randn(5, 7).t(), torch.tensor([3]), 3))
    with pytest.raises(ValueError, match="bits=9"):
        torch.ops.nm.sr(torch.randn(3), torch.rand(1, 3), 9)
    with pytest.raises(ValueError, match="bits=1"):
        sr_math(torch.randn(3), torch.rand(1, 3), 1)
    with pytest.raises(ValueError, match="uniforms have shape"):
        torch.ops.nm.sr(torch.randn(3, 4), torch.rand(1, 4, 3), 4)
    with pytest.raises(ValueError, match="int64 seeds"):
        torch.ops.nm.sr(torch.randn(3, 4), torch.tensor([1], dtype=torch.int32), 4)


def test_drawn_sr_is_reproducible_and_averages_samples():
    x = heavy_tailed(8, 16, seed=1)
    torch.manual_seed(5)
    a = SR.apply(x, bits=4, samples=2)
    torch.manual_seed(5)
    assert same(a, SR.apply(x, bits=4, samples=2))
    torch.manual_seed(5)
    seeds = torch.randint(0, 2**62, (2,))
    assert same(a, sr_math(x, torch.stack([uniform(s, x.shape, "cpu") for s in seeds]), 4))


# ---- (b) sr_math against the float64 reference ---------------------------------------------------


def boundary(x: torch.Tensor, u: torch.Tensor, scale: float) -> torch.Tensor:
    """Where fp32's v = fl(|x| / scale) may decide differently from the exact quotient: u within half
    an fp32 ulp of v of the exact fraction (v - lo). For v ≥ 2 that half ulp is ≥ 2^-23, wider than
    the 2^-24 grid of u, so such u exist (``test_the_fp32_boundary_is_real`` builds one)."""
    v = x.double().abs() / scale
    half_ulp = torch.exp2(torch.floor(torch.log2(v.clamp_min(2.0**-126))) - 24)
    dist = (torch.floor(v) + u.double() - v).abs()  # |u - exact fraction|; also covers v rounded to an integer
    return dist <= half_ulp * (1 + 2**-20)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("samples", [1, 2])
def test_sr_math_agrees_with_the_reference(dtype, bits, samples):
    base = heavy_tailed(24, 40, seed=bits).double()
    for amax in AMAXES[dtype]:
        x = (base / base.abs().max() * amax).to(dtype)
        u = grid_uniforms((samples, *x.shape), seed=bits + samples)
        codes, scale = reference_codes(x, u, bits)
        assert scale == sr_scale(x.float().abs().amax(), dtype, bits).item()
        per_sample = torch.stack([sr_math(x, u[s : s + 1], bits) for s in range(samples)]).double() / scale
        assert torch.equal(per_sample, torch.round(per_sample)), "integer codes"
        differ = per_sample != codes
        # the only admissible difference: fp32's v on the boundary, off by one code
        assert (boundary(x, u, scale) | ~differ).all(), (amax, differ.sum())
        assert ((per_sample - codes).abs() <= 1).all()
        # the mean of the samples: the per-sample codes summed and divided, times the scale
        mean = sr_math(x, u, bits).double()
        expected = ((per_sample.sum(0) / samples).float() * scale).to(dtype).double()
        assert torch.equal(mean, expected)


def test_the_fp32_boundary_is_real():
    """The admissible difference of the reference test does occur: amax = 7·(1 + 2^-19) gives
    scale = 1 + 2^-19 (fp32, 4 bits, keep = 20); |x| = 5 has v = 5/(1 + 2^-19) = 5 - 20·2^-21 + ε
    (0 < ε < 2^-22), which fp32 rounds to 5 - 20·2^-21. The uniform u = 1 - 20·2^-21 (on the 2^-24
    grid) lies between the fp32 fraction and the exact one: sr_math rounds down, the exact rule up."""
    x = torch.tensor([7 * (1 + 2**-19), 5.0])
    assert x[0].item() == 7 * (1 + 2**-19)
    u = torch.tensor([[0.5, 1 - 20 * 2**-21]])
    codes, scale = reference_codes(x, u, 4)
    assert scale == 1 + 2**-19
    assert codes[0, 1] == 5 and sr_math(x, u, 4)[1].item() == 4 * scale
    assert boundary(x, u, scale)[0, 1]


# ---- (c) structure -------------------------------------------------------------------------------


def structure_cases():
    for dtype in DTYPES:
        for bits in range(2, 9):
            base = heavy_tailed(16, 24, seed=bits).double()
            for amax in AMAXES[dtype]:
                yield dtype, bits, (base / base.abs().max() * amax).to(dtype)


def test_scale_is_rounded_up_to_keep_bits_and_outputs_are_exact_codes():
    for dtype, bits, x in structure_cases():
        L, keep = sr_levels(bits), max(PRECISION[dtype] - bits, 1)
        amax = Fraction(x.float().abs().max().item())
        scale = sr_scale(x.float().abs().amax(), dtype, bits)
        s = Fraction(scale.item())
        assert s == reference_scale(float(amax), dtype, bits), (dtype, bits, float(amax))
        assert s * L >= amax, "rounded up: max|x| is never above the top level"
        assert significant_bits(s) <= keep and (s / SMALLEST[dtype]).denominator == 1
        levels = float(s) * torch.arange(-L, L + 1, dtype=torch.float64)
        assert torch.equal(levels.to(dtype).double(), levels), "every level is exact in the dtype"
        u = grid_uniforms((1, *x.shape), seed=bits)
        y = sr_math(x, u, bits).double()
        c = y / float(s)
        assert torch.equal(c, torch.round(c)) and (c.abs() <= L).all(), "integer codes |c| <= L"
        v = x.double().abs() / float(s)
        assert ((c.abs() == torch.floor(v)) | (c.abs() == torch.ceil(v))).all(), "one of the two neighbours"
        assert (torch.sign(c) * torch.sign(x.double()) >= 0).all()
        i = x.abs().argmax()
        assert y.flatten()[i].abs() >= math.floor(float(amax / s)) * float(s) and c.flatten()[i].abs() <= L


def test_round_up_significand():
    t = torch.tensor([0.0, 1.0, 1.5, 1 + 2**-23, 3.0, 0.75 + 2**-20, float("inf"), float("nan"), 1e-45])
    r = round_up_significand(t, 2)
    want = [0.0, 1.0, 1.5, 1.5, 3.0, 1.0, float("inf"), float("nan"), 1e-45]
    assert same(r, torch.tensor(want))
    assert same(round_up_significand(t[:6], 0), torch.tensor([0.0, 1.0, 2.0, 2.0, 4.0, 1.0]))
    # never below the value, never more than one quantum above it, and never below round_significand
    g = torch.Generator().manual_seed(0)
    s = torch.exp(torch.randn(10000, generator=g) * 15).float()
    for keep in (1, 5, 20):
        up = round_up_significand(s, keep)
        assert (up >= s).all() and (up >= round_significand(s, keep)).all()
        _, e = torch.frexp(s)
        assert ((up.double() - s.double()) < torch.exp2((e - keep).double())).all()
        # subnormal results: 2^-149 quanta at least, exact in fp32
        small = s * 1e-40
        tiny = round_up_significand(small, keep, -149)
        assert (tiny >= small).all() and (tiny[small > 0] > 0).all()
        assert ((tiny.double() / 2**-149) == torch.round(tiny.double() / 2**-149)).all()


# ---- (d) unbiasedness -----------------------------------------------------------------------------


def draws_of(x: torch.Tensor, n: int, bits: int, samples: int, seed: int) -> torch.Tensor:
    """n independent draws: the op on n stacked copies (same max|x|), fresh uniforms per element."""
    g = torch.Generator().manual_seed(seed)
    seeds = torch.randint(0, 2**62, (samples,), generator=g)
    return torch.ops.nm.sr(x.expand(n, *x.shape).contiguous(), seeds, bits)


@pytest.mark.parametrize("bits,samples", [(4, 1), (2, 1), (8, 1), (4, 2)])
def test_unbiased_within_five_standard_errors(bits, samples):
    x = heavy_tailed(16, 32, seed=8)
    n = 4000
    draws = draws_of(x, n, bits, samples, seed=bits * 10 + samples)
    z, tail = unbiased(draws, x, bits, samples)
    assert z < 5 and tail > FIVE_SIGMA / 2
    assert abs(chi_square_z(draws, x, bits, samples)) < 5


def test_biased_mutations_are_rejected(monkeypatch):
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(4))  # fractions spread over [0, 1)
    n, bits = 4000, 4
    stacked = x.expand(n, *x.shape).contiguous()
    u = uniform(torch.tensor(11), (1, n, *x.shape), "cpu")
    unmutated = sr_math(stacked, u, bits)
    z, tail = unbiased(unmutated, x, bits, 1)
    assert z < 5 and tail > FIVE_SIGMA / 2 and abs(chi_square_z(unmutated, x, bits, 1)) < 5, "unmutated: pass"
    nearest = sr_math(stacked, torch.full_like(u, 0.5), bits)  # u ≡ 1/2: round to nearest
    floor = sr_math(stacked, torch.ones_like(u), bits)  # u ≡ 1: never up
    for biased in (nearest, floor):
        z, _ = unbiased(biased, x, bits, 1)
        assert z > 5 and chi_square_z(biased, x, bits, 1) > 5
    # p_up 2% low (u < p/1.02): too small for most single elements, not for the aggregate
    slight = sr_math(stacked, u * 1.02, bits)
    assert chi_square_z(slight, x, bits, 1) > 5
    # the scale rounded to nearest instead of up: max|x| lands above L·scale and is clipped. In bf16
    # (keep = 4 at 4 bits): 7.1875 / 7 = 1.027 rounds to 1, so 7.1875 always comes out as 7.
    y = torch.tensor([7.1875, -3.0, 0.25], dtype=torch.bfloat16)
    stacked, u = y.expand(n, 3).contiguous(), uniform(torch.tensor(3), (1, n, 3), "cpu")
    assert max_z(sr_math(stacked, u, bits), y, exact_variance(y, bits)) < 5
    monkeypatch.setattr(sr_module, "sr_scale",
                        lambda a, d, b, pow2=False: round_significand(a / sr_levels(b), scale_bits(d, b)))
    clipped = sr_math(stacked, u, bits)
    assert (clipped[:, 0] == 7).all() and max_z(clipped, y, exact_variance(y, bits)) > 5


# ---- (e) the variance -----------------------------------------------------------------------------


@pytest.mark.parametrize("samples", [1, 2, 4])
def test_variance_is_exact_and_samples_divide_it(samples):
    x = heavy_tailed(16, 32, seed=10)
    n, bits = 3000, 4
    draws = draws_of(x, n, bits, samples, seed=samples)
    exact = exact_variance(x, bits, samples).sum(-1)  # per row of 32 elements
    assert variance_z(draws, exact) < 5
    # mutations: twice and half the variance must be rejected by the same bound
    assert variance_z(draws, 2 * exact) > 5 and variance_z(draws, exact / 2) > 5
    wider = x + (draws - x) * math.sqrt(2)  # unbiased, twice the variance
    assert variance_z(wider, exact) > 5


# ---- (f) specials ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_non_finite_tiny_and_empty(dtype):
    u = grid_uniforms((1, 4, 4), seed=0)
    seeds = torch.tensor([5])
    ops_ = [lambda t, b=4: torch.ops.nm.sr(t, u, b), lambda t, b=4: torch.ops.nm.sr(t, seeds, b),
            lambda t, b=4: sr_math(t, u, b)]
    for op in ops_:
        assert same(op(torch.zeros(4, 4, dtype=dtype)), torch.zeros(4, 4, dtype=dtype))
        x = heavy_tailed(4, 4).to(dtype)
        x[1, 2] = float("nan")
        assert op(x).isnan().all()
        x[1, 2] = float("inf")
        assert not torch.isfinite(op(x)).any()
        x[1, 2] = -float("inf")
        assert not torch.isfinite(op(x)).any()
        # the smallest subnormal of the dtype as max|x|, and a tiny normal: finite, exact, unbiased levels
        smallest = float(SMALLEST[dtype])
        base = heavy_tailed(4, 4, seed=2).double()
        for amax in (smallest, 3 * smallest, torch.finfo(dtype).smallest_normal):
            t = (base / base.abs().max() * amax).to(dtype)
            y = op(t).double()
            s = sr_scale(t.float().abs().amax(), dtype, 4).item()
            assert s > 0 and torch.isfinite(y).all()
            assert torch.equal(y / s, torch.round(y / s)) and ((y - t.double()).abs() < s).all()
    empty = torch.empty(0, 5, dtype=dtype)
    for y in (torch.ops.nm.sr(empty, torch.rand(2, 0, 5), 4), torch.ops.nm.sr(empty, seeds, 4),
              sr_math(empty, torch.rand(1, 0, 5), 4), SR.apply(empty, bits=4, samples=1)):
        assert y.shape == (0, 5) and y.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_top_of_the_range_saturates_instead_of_overflowing(dtype):
    big = torch.finfo(dtype).max
    x = torch.tensor([big, -big, 0.9 * big, 1.0]).to(dtype)
    for bits in (2, 4, 8):
        u = grid_uniforms((2, 4), seed=bits)
        for y in (sr_math(x, u, bits), torch.ops.nm.sr(x, u, bits), torch.ops.nm.sr(x, torch.tensor([1, 2]), bits)):
            assert torch.isfinite(y).all() and (y.abs() <= big).all(), (dtype, bits)
            assert (torch.sign(y) * torch.sign(x) >= 0).all()


# ---- (g) the Triton kernel ------------------------------------------------------------------------


@pytest.mark.triton
@pytest.mark.skipif(not cuda.available(), reason="needs Triton (pip install triton)")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,samples", [(4, 1), (2, 2), (8, 3)])
def test_triton_kernel_gives_the_bits_of_sr_math(dtype, bits, samples):
    from tests.kernels.test_cuda_kernels import ON_GPU, on

    for name, x, _ in layouts(dtype, seed=bits):
        finite = torch.nan_to_num(x, nan=0.0, posinf=0.0)
        # Triton 3.9's interpreter loads bf16 subnormals wrongly (see test_cuda_kernels); GPUs do not
        tiny = [] if dtype == torch.bfloat16 and not ON_GPU else [finite * 1e-38]
        for t in (x, finite, *tiny, torch.zeros_like(x)):
            seeds = torch.tensor([7, 2**62 - 1, 99][:samples])
            stacked = torch.stack([uniform(s, t.shape, "cpu") for s in seeds])
            y = cuda.sr(on(t), on(seeds), bits)
            assert same(y.cpu(), sr_math(t, stacked, bits)), name
            assert y.stride() == torch.empty_like(t).stride(), name
            u = grid_uniforms((samples, *t.shape), seed=3)
            assert same(cuda.sr(on(t), on(u), bits).cpu(), sr_math(t, u, bits)), name
            if samples == 1:  # the int8 codes (and scale) of the CPU kernel, non-finite inputs included
                codes, scale = cuda.sr(on(t), on(seeds), bits, codes=torch.int8)
                ref_codes, ref_scale = torch.ops.nm.sr_int8(t, seeds, bits)
                assert torch.equal(codes.cpu(), ref_codes) and same(scale.cpu(), ref_scale), name

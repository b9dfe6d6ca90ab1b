"""Power-of-two scales (``pow2`` of nm.sr / nm.absmax and their int8 codes ops; option ``pow2_scales``).

- the scale is the smallest power of two at or above max|x| / L (at least the dtype's smallest
  subnormal, at most 2^127), per tensor and per row, in the portable math and the CPU kernels, for
  every dtype; the codes times it are the values, never clipped (test_scales runs the layouts);
- the int8 GEMM on two such operands rescales in fp32: the sums times the scales' product is the exact
  product rounded once to fp32, bit for bit against an integer oracle, int64 sums (split K) included;
  the bias and a bf16/fp16 output round once more each, as documented, and nothing else does;
- the variance, derived: SR stays unbiased with the exact per-element variance (v - lo)(lo + 1 - v)·s²
  at the power-of-two s (the finer scale's formula fails on the same draws); on data spread over many
  levels the variance grows by r² = (s_pow2 / s)², and absmax's squared error as well.
"""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

import nmcompile  # noqa: F401  (registers the ops)
from nmcompile import NMConfig
from nmcompile.kernels import cpu, gemm
from nmcompile.kernels.absmax import absmax_math
from nmcompile.kernels.int8 import scaled_sums
from nmcompile.kernels.sr import sr_levels, sr_scale_of
from tests.kernels.stats import max_z, variance_z
from tests.kernels.test_int8 import codes, round_exact
from tests.kernels.test_sr import AMAXES, SMALLEST, reference_scale

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
needs_cpu = pytest.mark.skipif(not cpu.available(), reason=f"CPU kernels not built: {cpu.failure()}")


def pow2_scale(amax: float, dtype: torch.dtype, bits: int) -> Fraction:
    """The oracle: the smallest power of two >= amax / L, at least the dtype's smallest subnormal, at most 2^127."""
    target = Fraction(amax) / sr_levels(bits)
    if target == 0:
        return Fraction(0)
    scale = SMALLEST[dtype]
    while scale < target:
        scale *= 2
    return min(scale, Fraction(2) ** 127)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_the_scale_is_the_smallest_power_of_two_at_or_above_amax_over_levels(dtype, bits):
    levels = sr_levels(bits)
    finite = torch.finfo(dtype).max
    amaxes = [a for a in AMAXES[dtype] if a <= finite] + [levels * 2.0**-3, levels * 2.0**-3 * (1 + 2**-10), 0.3]
    x = torch.zeros(len(amaxes), 4, dtype=dtype)
    for r, a in enumerate(amaxes):
        x[r, 0], x[r, 1:] = a, -a * 0.37
    x = x.to(dtype)
    expected = [pow2_scale(float(x[r].float().abs().max()), dtype, bits) for r in range(len(amaxes))]
    for name, scales in (("sr math", sr_scale_of(x, bits, 1, True)),
                         ("sr kernel", torch.ops.nm.sr_int8(x, torch.tensor([3]), bits, 1, True)[1]),
                         ("absmax math", absmax_math(x, bits, 1, True)[1]),
                         ("absmax kernel", torch.ops.nm.absmax_int8(x, bits, 1, True)[1])):
        got = [Fraction(float(s)) for s in scales.flatten()]
        assert got == expected, name
        # the finer scale where it differs: 1 <= r < 2 (and r = 1 at an exact power of two)
        for r, a in enumerate(amaxes):
            fine = reference_scale(float(x[r].float().abs().max()), dtype, bits)
            assert fine <= got[r] < 2 * fine or got[r] == SMALLEST[dtype] or got[r] == 2**127, (name, a)
    # an exact power of two times L is its own scale; one ulp above doubles it
    assert Fraction(float(sr_scale_of(x[-3:-2], bits, None, True))) == Fraction(1, 8)
    if dtype == torch.float32:
        assert Fraction(float(sr_scale_of(x[-2:-1], bits, None, True))) == Fraction(1, 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_codes_times_the_power_of_two_are_the_values_and_nothing_is_clipped(dtype):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(8, 300, generator=g) * torch.logspace(-4, 1, 8).view(8, 1)).to(dtype)
    for dim in (None, 1):
        for op, values, args in ((torch.ops.nm.sr_int8, torch.ops.nm.sr, (torch.tensor([9]), 8)),
                                 (torch.ops.nm.absmax_int8, torch.ops.nm.absmax, (8,))):
            c, scale = op(x, *args, dim, True)
            assert torch.equal((c.float() * scale).to(dtype), values(x, *args, dim, True))
            assert (torch.frexp(scale)[0] == 0.5).all()  # powers of two
            assert c.abs().max() <= sr_levels(8)
            q = (c.float() * scale)
            # never clipped: every value lies within one level of its code, rounding up or to nearest
            assert ((q - x.float()).abs() <= scale * (1 if op is torch.ops.nm.sr_int8 else 0.5)).all()


def test_options_validate_pow2_scales_naming_what_is_allowed():
    assert NMConfig(quant="sr", bits=8, scales="row", pow2_scales=True).describe() == "sr8/row/pow2"
    both = NMConfig(quant="sr", bits=8, fwd_quant="absmax", fwd_bits=8, pow2_scales=True)
    assert both.describe() == "sr8/pow2, absmax8/pow2 forward"
    with pytest.raises(ValueError, match=r"pow2_scales=True is not available for quant='luq'.*'sr', 'absmax'"):
        NMConfig(quant="luq", pow2_scales=True)
    with pytest.raises(ValueError, match=r"not available for fwd_quant='sawb'"):
        NMConfig(quant="sr", fwd_quant="sawb", pow2_scales=True)
    with pytest.raises(ValueError, match=r"neither is set"):
        NMConfig(sparsity="2:4", pow2_scales=True)
    with pytest.raises(ValueError, match=r"pow2_scales='yes' must be True or False"):
        NMConfig(quant="sr", pow2_scales="yes")


# -- the rescale ------------------------------------------------------------------------------------


def powers_of_two(shape, generator, low: int, high: int) -> torch.Tensor:
    return torch.ldexp(torch.ones(shape), torch.randint(low, high, shape, generator=generator)).float()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_the_fp32_rescale_is_the_exact_product_rounded_once(dtype, bias):
    """Per row of A and column of B, sums up to 2^31 (K = 3000 at the largest codes) and int64 sums
    (K above the int32 bound): fp32(sums·s_a·s_b) is the exact product rounded once; a bias and a
    narrower output each round once more, in that order."""
    g = torch.Generator().manual_seed(6)
    for k in (3000, gemm.INT32_K + 40):
        a, b = codes((5, k), g), codes((k, 4), g, low=100)
        a[:2] = 127  # sums near the largest the codes allow
        sa, sb = powers_of_two((5, 1), g, -40, -5), powers_of_two((1, 4), g, -30, -12)  # fp16's range too
        b_ = torch.randn(4, generator=g) if bias else None
        sums = gemm.int_sums(a, b)
        out = scaled_sums(sums, sa, sb, b_, dtype, pow2=True)
        assert out.dtype == dtype
        for i in range(5):
            for j in range(4):
                exact = int(sums[i, j]) * Fraction(float(sa[i, 0])) * Fraction(float(sb[0, j]))
                once = round_exact(exact, torch.float32)
                if bias:
                    once = round_exact(Fraction(once) + Fraction(float(b_[j].to(dtype))), torch.float32)
                assert float(out[i, j]) == round_exact(Fraction(once), dtype), (k, i, j)
        if not bias and dtype == torch.float32:  # one rounding in all: what the float64 path gives too
            assert torch.equal(out, scaled_sums(sums, sa, sb, None, dtype))


def test_the_fp32_rescale_computes_nothing_in_float64():
    """The point of it: no float64 in the rescale (the default path has it, so the check can fail)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    g = torch.Generator().manual_seed(1)
    a, b = codes((4, 64), g), codes((64, 3), g)
    sa, sb = powers_of_two((4, 1), g, -10, 0), powers_of_two((1, 3), g, -10, 0)
    for pow2 in (True, False):
        traced = make_fx(lambda a, b, sa, sb: scaled_sums(gemm.int_sums(a, b), sa, sb, None, torch.bfloat16, pow2))(
            a, b, sa, sb)
        dtypes = {n.meta["val"].dtype for n in traced.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)}
        assert (torch.float64 in dtypes) != pow2, (pow2, dtypes)


# -- the variance ---------------------------------------------------------------------------------------


def rows_just_above_a_power_of_two(bits: int, seed: int) -> torch.Tensor:
    """Rows whose max|x| / L is 1.1·2^k: the power-of-two scale is 2^(k+1), r = 2/1.1 (r² = 3.3)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 64, generator=g)
    x = x / x.abs().amax(1, keepdim=True) * (1.1 * sr_levels(bits)) * torch.logspace(-3, 0, 8, base=2).view(8, 1)
    return x.float()


def exact_variance(x: torch.Tensor, scales: list) -> torch.Tensor:
    """(v - lo)(lo + 1 - v)·s² per element (float64), row r with scale scales[r]."""
    s = torch.tensor([float(v) for v in scales], dtype=torch.float64).view(-1, 1)
    v = x.double().abs() / s
    lo = torch.floor(v)
    return (v - lo) * (lo + 1 - v) * s**2


@pytest.mark.parametrize("bits", [4, 8])
def test_sr_with_power_of_two_scales_is_unbiased_with_the_variance_at_its_scale(bits):
    x = rows_just_above_a_power_of_two(bits, seed=bits)
    n = 3000
    seeds = torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(10 + bits))
    draws = torch.ops.nm.sr(x.expand(n, *x.shape).contiguous(), seeds, bits, 2, True)
    pow2 = [pow2_scale(float(row.abs().max()), x.dtype, bits) for row in x]
    fine = [reference_scale(float(row.abs().max()), x.dtype, bits) for row in x]
    exact = exact_variance(x, pow2).sum(-1)
    assert variance_z(draws, exact) < 5
    assert variance_z(draws, exact_variance(x, fine).sum(-1)) > 5  # the finer grid's variance: not this op's


def test_sr_with_power_of_two_scales_is_unbiased_element_by_element():
    """Every element whose rarer rounding is expected at least 5 times (where 5 standard errors mean what
    they say) has its mean within 5 of them, with the exact variance at the power-of-two scale."""
    x = rows_just_above_a_power_of_two(8, seed=3)
    n = 4000
    seeds = torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(4))
    draws = torch.ops.nm.sr(x.expand(n, *x.shape).contiguous(), seeds, 8, 2, True)  # one scale per (copy, row)
    scales = torch.tensor([float(pow2_scale(float(row.abs().max()), x.dtype, 8)) for row in x]).view(-1, 1)
    p = torch.frac(x.abs() / scales)
    frequent = n * torch.minimum(p, 1 - p) >= 5
    assert frequent.sum() > x.numel() / 2
    variance = exact_variance(x, scales.flatten().tolist())
    assert max_z(draws[:, frequent], x[frequent], variance[frequent]) < 5
    # a bias of a tenth of the grid on the same draws (a mutation) is found
    assert max_z(draws[:, frequent] + 0.1 * scales.expand_as(x)[frequent], x[frequent], variance[frequent]) > 5


@pytest.mark.parametrize("quantizer", ["sr", "absmax"])
def test_on_data_spread_over_many_levels_the_variance_grows_by_r_squared(quantizer):
    """x spread evenly over [-amax, amax]: frac(|x| / s) is equidistributed on both grids, so SR's mean
    variance is s²/6 and round-to-nearest's mean squared error s²/12 at either scale; their ratio is
    r² = (s_pow2 / s)², here (2 / 1.1)² = 3.31, to within the ramp's discreteness."""
    levels = sr_levels(8)
    amax = 1.1 * levels * 2.0**-7
    x = torch.linspace(-amax, amax, 200_001, dtype=torch.float64).float()
    s_fine = reference_scale(float(x.abs().max()), x.dtype, 8)
    s_pow2 = pow2_scale(float(x.abs().max()), x.dtype, 8)
    r2 = float(s_pow2 / s_fine) ** 2
    if quantizer == "sr":
        fine, pow2 = exact_variance(x[None], [s_fine]).mean(), exact_variance(x[None], [s_pow2]).mean()
        assert abs(float(pow2) / (float(s_pow2) ** 2 / 6) - 1) < 1e-2
    else:
        fine = (absmax_math(x, 8)[0].double() - x.double()).pow(2).mean()
        pow2 = (absmax_math(x, 8, None, True)[0].double() - x.double()).pow(2).mean()
        assert abs(float(pow2) / (float(s_pow2) ** 2 / 12) - 1) < 1e-2
    assert math.isclose(float(pow2 / fine), r2, rel_tol=2e-2) and 3.2 < r2 < 3.4


def test_records_and_onnx_say_where_scales_are_powers_of_two():
    pytest.importorskip("onnx")
    from nmcompile.capture import run_captured
    from nmcompile.export import to_onnx
    from tests.nmcompile.test_catalog import model_and_input

    model, x = model_and_input()
    run = run_captured(model, (x,), {"quant": "sr", "bits": 8, "fwd_quant": "absmax", "fwd_bits": 8,
                                     "pow2_scales": True, "lowering": "emulate"})
    transforms = {t for r in run.records for t in r.transforms}
    assert {"sr8/pow2", "absmax8/pow2 W,X"} <= transforms, transforms
    model = to_onnx(run.graphs[0].joint, "g0_joint", strip_stack_traces=True)
    ours = [n for n in model.graph.node if n.domain == "com.nmcompile"]
    assert ours and all({(a.name, a.i) for a in n.attribute} >= {("bits", 8), ("pow2", 1)} for n in ours)

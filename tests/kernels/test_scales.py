"""Per-row scales (kernels/scales.py): LUQ, SR and absmax with one scale per slice along ``dim``.

- the definition: the op with ``dim`` is the per-tensor op applied to every slice along ``dim`` on its
  own (its own max, its own uniforms), bit for bit, zero, NaN and Inf slices included;
- the CPU kernels give the portable math's bits for every dtype, layout (transposed, permuted, not
  dense), dim, explicit uniforms of any strides and seeds; the int8 forms' codes times their per-slice
  scales (keepdim) are the values;
- statistics with bounds from theory: SR per row is unbiased and its variance is the exact per-row
  (v - lo)(lo + 1 - v)·scale_r², which the per-tensor formula (a mutation) fails on the same draws;
- the int8 GEMM on per-row scales (rows of A, columns of B) is the exact product rounded once;
- option validation names what is allowed.
"""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch

import nmcompile  # noqa: F401  (registers the ops)
from nmcompile import NMConfig
from nmcompile.kernels import cpu
from nmcompile.kernels.absmax import absmax_math
from nmcompile.kernels.luq import luq_math
from nmcompile.kernels.random import uniform
from nmcompile.kernels.sr import sr_levels, sr_math
from tests.conftest import heavy_tailed
from tests.kernels.stats import max_z, variance_z
from tests.kernels.test_cpu_kernels import layouts, same
from tests.kernels.test_int8 import codes, round_exact
from tests.kernels.test_sr import FIVE_SIGMA, reference_scale, unbiased

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
needs_cpu = pytest.mark.skipif(not cpu.available(), reason=f"CPU kernels not built: {cpu.failure()}")

# name -> (portable math (x, u, dim), the op (x, u, dim), its int8 codes op (x, u, dim))
QUANTIZERS = {
    "sr8": (lambda x, u, d: sr_math(x, u, 8, d), lambda x, u, d: torch.ops.nm.sr(x, u, 8, d),
            lambda x, u, d: torch.ops.nm.sr_int8(x, u[:1], 8, d)),
    "sr3": (lambda x, u, d: sr_math(x, u, 3, d), lambda x, u, d: torch.ops.nm.sr(x, u, 3, d),
            lambda x, u, d: torch.ops.nm.sr_int8(x, u[:1], 3, d)),
    "luq4": (lambda x, u, d: luq_math(x, u, 4, "strict", d), lambda x, u, d: torch.ops.nm.luq(x, u, 4, "strict", d),
             lambda x, u, d: torch.ops.nm.luq_int8(x, u[:1], 4, "strict", d)),
    "absmax8": (lambda x, u, d: absmax_math(x, 8, d)[0], lambda x, u, d: torch.ops.nm.absmax(x, 8, d),
                lambda x, u, d: torch.ops.nm.absmax_int8(x, 8, d)),
    # power-of-two scales (tests/kernels/test_pow2.py): the same definition, layouts and special values
    "sr8/pow2": (lambda x, u, d: sr_math(x, u, 8, d, True), lambda x, u, d: torch.ops.nm.sr(x, u, 8, d, True),
                 lambda x, u, d: torch.ops.nm.sr_int8(x, u[:1], 8, d, True)),
    "absmax8/pow2": (lambda x, u, d: absmax_math(x, 8, d, True)[0], lambda x, u, d: torch.ops.nm.absmax(x, 8, d, True),
                     lambda x, u, d: torch.ops.nm.absmax_int8(x, 8, d, True)),
}


def uniforms_like(x: torch.Tensor, samples: int, seed: int) -> torch.Tensor:
    return torch.stack([uniform(torch.tensor(seed + s), x.shape, "cpu") for s in range(samples)])


def slice_by_slice(math, x: torch.Tensor, u: torch.Tensor, dim: int) -> torch.Tensor:
    """The per-tensor math on every slice along ``dim`` alone, reassembled."""
    rows = x.movedim(dim, -1)
    shape = rows.shape
    rows, ur = rows.reshape(-1, shape[-1]), u.movedim(dim + 1, -1).reshape(u.shape[0], -1, shape[-1])
    out = torch.stack([math(rows[r], ur[:, r], None) for r in range(rows.shape[0])])
    return out.reshape(shape).movedim(-1, dim)


def special_rows(dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 5, 12, generator=g) * torch.logspace(-6, 2, 6).view(6, 1, 1)
    x[1, 2] = 0.0  # an all-zero row
    x[2, 3, 4] = float("nan")
    x[3, 0, 7] = float("inf")
    x[4, 1] = 1e-41  # denormal in fp32, zero in fp16
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_per_row_is_the_per_tensor_op_on_each_slice(name, dtype):
    math, _, _ = QUANTIZERS[name]
    x = special_rows(dtype)
    u = uniforms_like(x, 2 if name.startswith("sr") else 1, seed=7)
    for dim in (0, 1, 2, -1):
        assert same(math(x, u, dim), slice_by_slice(math, x, u, dim % x.dim())), dim
    # a NaN or Inf reaches its own slices only; per tensor it reaches everything
    rows = math(x, u, 2)
    assert rows[2, 3].isnan().all() and not rows[2, 2].isnan().any()
    assert math(x, u, None).isfinite().sum() == 0


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_cpu_kernels_give_the_bits_of_the_math_for_every_layout_and_dim(name, dtype):
    math, op, int8_op = QUANTIZERS[name]
    for layout, x, dims in layouts(dtype, seed=3):
        for dim in (*dims, None):
            seeds = torch.tensor([11, 12]) if name.startswith("sr") else torch.tensor([11])
            u = torch.stack([uniform(s, x.shape, "cpu") for s in seeds])
            expected = math(x, u, dim)
            assert same(op(x, seeds, dim), expected), (layout, dim, "seeds")
            strided = u.transpose(-1, -2).contiguous().transpose(-1, -2) if x.dim() > 1 else u
            assert same(op(x, strided, dim), expected), (layout, dim, "uniforms")
            c, scale = int8_op(x, seeds, dim)
            kept = (*x.shape[:dim], 1, *x.shape[dim + 1:]) if dim is not None else ()
            assert c.dtype == torch.int8 and c.stride() == torch.empty_like(x).stride() and scale.shape == kept
            one = math(x, u[:1], dim)
            finite = torch.isfinite(scale).expand(x.shape)  # a NaN/Inf slice: codes 0, its scale non-finite
            assert same((c.float() * scale).to(dtype)[finite], one[finite]), (layout, dim, "codes")
            assert not c[~finite].any() and not one[~finite].isfinite().any()


def rows_of_magnitudes(seed: int) -> torch.Tensor:
    """16 rows of gradient-like values whose maxima span three decades: per tensor, the small rows
    get the large row's coarse grid."""
    return heavy_tailed(16, 32, seed=seed) * torch.logspace(-3, 0, 16).view(16, 1)


def row_variance(x: torch.Tensor, bits: int, per_row: bool) -> torch.Tensor:
    """The exact per-element variance (v - lo)(lo + 1 - v)·scale² (float64), each row with its own
    scale (``per_row``) or with the tensor's."""
    whole = float(reference_scale(x.double().abs().max().item(), x.dtype, bits))
    scales = torch.tensor([float(reference_scale(r.double().abs().max().item(), x.dtype, bits)) if per_row
                           else whole for r in x], dtype=torch.float64).view(-1, 1)
    v = x.double().abs() / scales
    lo = torch.floor(v)
    return (v - lo) * (lo + 1 - v) * scales**2


@pytest.mark.parametrize("bits", [4, 8])
def test_sr_per_row_is_unbiased_with_the_exact_per_row_variance(bits):
    x = rows_of_magnitudes(seed=bits)
    n = 3000
    seeds = torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(bits))
    draws = torch.ops.nm.sr(x.expand(n, *x.shape).contiguous(), seeds, bits, 2)  # one scale per (copy, row)
    for r in range(x.shape[0]):  # each row is SR per tensor with its own max (test_sr's exact tests)
        z, tail = unbiased(draws[:, r], x[r], bits, 1)
        assert z < 5 and tail > FIVE_SIGMA / 2, r
    exact = row_variance(x, bits, per_row=True)
    assert variance_z(draws, exact.sum(-1)) < 5
    # the same bound rejects the per-tensor variance (what per-row scales remove) and wrong factors
    assert variance_z(draws, row_variance(x, bits, per_row=False).sum(-1)) > 5
    assert variance_z(draws, 2 * exact.sum(-1)) > 5 and variance_z(draws, exact.sum(-1) / 2) > 5


def test_per_row_grids_are_each_rows_own_and_never_clip():
    x = rows_of_magnitudes(seed=1)
    levels = sr_levels(8)
    q, scale = absmax_math(x, 8, 1)
    for r in range(x.shape[0]):
        s = Fraction(float(scale[r, 0]))
        assert s == reference_scale(x[r].double().abs().max().item(), x.dtype, 8)
        c = [Fraction(float(v)) / s for v in q[r]]
        assert all(k.denominator == 1 and abs(k) <= levels for k in c)  # integer codes, nothing clipped
        assert ((q[r].double() - x[r].double()).abs() <= float(s) / 2).all()  # round to nearest
    assert max_z(q.expand(2, *q.shape), x, torch.zeros_like(x)) == float("inf")  # deterministic: biased


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_mm_with_per_row_scales_is_the_exact_product_rounded_once(dtype):
    g = torch.Generator().manual_seed(4)
    a, b = codes((6, 3000), g), codes((3000, 5), g, low=0)
    a[:3] = a[:3].abs()
    sa = torch.rand((6, 1), generator=g) * 1e-3 + 1e-4  # one scale per row of A (24-bit significands)
    sb = torch.rand((1, 5), generator=g) * 1e-2 + 1e-3  # one per column of B
    out = torch.ops.nm.int8_mm(a, sa, b, sb, None, dtype)
    sums = a.long() @ b.long()
    for i in range(6):
        for j in range(5):
            exact = sums[i, j].item() * Fraction(float(sa[i, 0])) * Fraction(float(sb[0, j]))
            assert out[i, j].item() == round_exact(exact, dtype), (i, j)
    one = torch.tensor(1.0)
    with pytest.raises(ValueError, match=r"scale_a must be fp32, one value or of shape \(6, 1\)"):
        torch.ops.nm.int8_mm(a, sa.t(), b, sb, None, dtype)  # per column of A: varies along K
    with pytest.raises(ValueError, match=r"scale_b must be fp32, one value or of shape \(1, 5\)"):
        torch.ops.nm.int8_mm(a, one, b, sb.t(), None, dtype)


def test_options_name_what_is_allowed():
    assert NMConfig(quant="sr", bits=8, scales="row").describe() == "sr8/row"
    assert "absmax8/row forward" in NMConfig(fwd_quant="absmax", fwd_bits=8, fwd_scales="row").describe()
    with pytest.raises(ValueError, match="scales='rows' is not allowed; choose one of 'tensor', 'row'"):
        NMConfig(quant="sr", scales="rows")
    with pytest.raises(ValueError, match="scales='row' chooses the scales of quant, which is not set"):
        NMConfig(scales="row")
    with pytest.raises(ValueError, match="fwd_scales='row' is not available for fwd_quant='sawb'.*'absmax'"):
        NMConfig(fwd_quant="sawb", fwd_scales="row")
    with pytest.raises(ValueError, match=r"nm.sr: dim=2 is out of range for an input of shape \(3, 4\)"):
        torch.ops.nm.sr(torch.ones(3, 4), torch.tensor([1]), 8, 2)

"""Exact INT8 GEMMs and the int8 codes of the quantizers (kernels/int8.py, gemm.int8_mm, nm.*_int8, nm.absmax).

- ``nm.int8_mm``: its integer sums are the int64 product exactly (random codes, the largest codes of
  both signs, a K above the int32 bound, odd shapes, transposed operands), and its output is the
  exact rational product of the dequantized codes plus the bias rounded once to the output dtype:
  checked against an oracle in Python's exact rationals, on random operands and on a constructed
  sum whose bf16 rounding a detour through fp32 gets wrong.
- the codes ops: codes·scale is the value op's output bit for bit (every dtype, transposed layouts,
  zeros, NaN), codes stay within the form's ``max_code``, and the portable path gives the CPU
  kernel's codes; forms that have no int8 codes are refused with the reason; with ``times`` the
  gradient codes ops give the codes of the fp32 product x·times bit for bit, and a multiplier that
  does not broadcast to x is refused naming its shape.
- absmax: the float64 reference, never clipped (|q - x| <= scale / 2), exact codes, STE gradient.
"""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch

import nmcompile  # noqa: F401  (registers the ops)
from nmcompile.kernels import gemm, ops
from nmcompile.kernels.absmax import absmax_math
from nmcompile.kernels.catalog import OPS
from nmcompile.kernels.int8 import int8_codes, round_via_odd
from nmcompile.kernels.sr import sr_levels, sr_scale

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# precision p (significant bits) and smallest normal exponent of each output dtype
FORMATS = {torch.float32: (24, -126), torch.bfloat16: (8, -126), torch.float16: (11, -14)}


def round_exact(q: Fraction, dtype: torch.dtype) -> float:
    """The rational ``q`` rounded to nearest (ties to even) in ``dtype``: the oracle, in integers only."""
    if q == 0:
        return 0.0
    p, emin = FORMATS[dtype]
    sign, q = (-1 if q < 0 else 1), abs(q)
    e = q.numerator.bit_length() - q.denominator.bit_length()  # 2^e <= q < 2^(e+2)
    if Fraction(2) ** e > q:
        e -= 1
    quantum = Fraction(2) ** (max(e, emin) - p + 1)  # the spacing of dtype's numbers around q
    n, rest = divmod(q, quantum)
    if rest > quantum / 2 or (rest == quantum / 2 and n % 2 == 1):
        n += 1
    value = float(n * quantum)  # exact: a few significant bits (overflow is not exercised here)
    return sign * value


def codes(shape, generator, low=-127, high=127) -> torch.Tensor:
    return torch.randint(low, high + 1, shape, generator=generator, dtype=torch.int8)


def test_int_sums_are_exact_including_the_largest_codes_and_a_split_k():
    g = torch.Generator().manual_seed(0)
    for m, k, n in [(1, 1, 1), (3, 5, 7), (17, 33, 9), (64, 256, 48)]:
        a, b = codes((m, k), g), codes((k, n), g)
        assert torch.equal(gemm.int_sums(a, b).long(), a.long() @ b.long())
        # transposed layouts, as the lowering hands them over
        assert torch.equal(gemm.int_sums(a.t().contiguous().t(), b.t().contiguous().t()).long(), a.long() @ b.long())
    # K above the int32 bound: every product 127·127 (or -128·-128), sums beyond 2^31
    for value in (127, -128):
        k = gemm.INT32_K + 9000
        a = torch.full((2, k), value, dtype=torch.int8)
        b = torch.full((k, 3), value, dtype=torch.int8)
        sums = gemm.int_sums(a, b)
        assert sums.dtype == torch.int64 and (sums == value * value * k).all() and value * value * k > 2**31


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_int8_mm_is_the_exact_product_rounded_once(dtype, bias):
    g = torch.Generator().manual_seed(1)
    # sums up to ~2^26, beyond fp32's integers: the rows of non-negative codes
    a, b = codes((6, 4000), g), codes((4000, 5), g, low=0)
    a[:3] = a[:3].abs()
    # scales with full 24-bit significands, so that the product of the two is not a short number
    sa = torch.rand((), generator=g) * 1e-3 + 1e-4
    sb = torch.rand((), generator=g) * 1e-2 + 1e-3
    c = torch.randn(5, generator=g).to(dtype) if bias else None
    out = torch.ops.nm.int8_mm(a, sa, b.t().contiguous().t(), sb, c, dtype)
    assert out.dtype == dtype and out.shape == (6, 5)
    sums = a.long() @ b.long()
    assert sums.abs().max() > 2**24
    scale = Fraction(float(sa)) * Fraction(float(sb))
    for i in range(6):
        for j in range(5):
            exact = sums[i, j].item() * scale + (Fraction(float(c[j])) if bias else 0)
            assert out[i, j].item() == round_exact(exact, dtype), (i, j)


def test_bf16_rounding_goes_through_fp32_rounded_to_odd_not_to_nearest():
    """Σ = 2^30 + 2^22 + 1 at scale 2^-30 is 1 + 2^-8 + 2^-30: just above the midpoint between bf16's 1
    and 1 + 2^-7, so it rounds up. Rounded to fp32 first (to nearest) it lands on the midpoint, and the
    tie then goes to 1: the detour rounds twice; the int8 GEMM does not."""
    target = 2**30 + 2**22 + 1
    full, rest = divmod(target, 127 * 127)
    q, s = divmod(rest, 127)
    a = torch.tensor([[127] * (full + 2)], dtype=torch.int8)
    b = torch.tensor([[127]] * full + [[q], [s]], dtype=torch.int8)
    a[0, -1] = 1
    assert (a.long() @ b.long()).item() == target
    scale = torch.tensor(2.0**-15)
    out = torch.ops.nm.int8_mm(a, scale, b, scale, None, torch.bfloat16)
    assert out.item() == 1 + 2**-7 == round_exact(Fraction(target, 2**30), torch.bfloat16)
    detour = (torch.tensor(float(target)).double() * 2.0**-30).float().bfloat16()
    assert detour.item() == 1.0  # what rounding twice would have given


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_via_odd_is_correct_rounding_from_float64(dtype):
    g = torch.Generator().manual_seed(2)
    p = FORMATS[dtype][0]
    # values near the dtype's midpoints, just above, just below and on them, with random exponents
    base = torch.randint(2 ** (p - 1), 2**p, (2000,), generator=g).double() + 0.5  # p-bit midpoints
    nudge = torch.tensor([-2.0**-30, 0.0, 2.0**-30]).repeat(667)[:2000]
    d = (base + nudge) * torch.randint(-20, 1, (2000,), generator=g).double().exp2() / 2**p
    d = torch.where(torch.rand(2000, generator=g) < 0.5, -d, d)
    out = round_via_odd(d, dtype)
    oracle = torch.tensor([round_exact(Fraction(x), dtype) for x in d.tolist()], dtype=torch.float64)
    assert torch.equal(out.double(), oracle)
    assert not torch.equal(d.float().to(dtype).double(), oracle), "rounding through fp32 to nearest would differ"


def test_int8_mm_refuses_bad_operands():
    a, b = torch.zeros(4, 8, dtype=torch.int8), torch.zeros(8, 3, dtype=torch.int8)
    one = torch.tensor(1.0)
    with pytest.raises(ValueError, match="must be int8 codes, got torch.float32"):
        torch.ops.nm.int8_mm(a.float(), one, b, one, None, torch.float32)
    with pytest.raises(ValueError, match=r"scale_b must be fp32, one value or of shape \(1, 3\)"):
        torch.ops.nm.int8_mm(a, one, b, torch.ones(3), None, torch.float32)
    with pytest.raises(RuntimeError, match="inner sizes differ"):
        torch.ops.nm.int8_mm(a, one, b.t(), one, None, torch.float32)
    assert torch.equal(torch.ops.nm.int8_mm(a[:, :0], one, b[:0], one, None, torch.float32), torch.zeros(4, 3))


# -- the codes ops ------------------------------------------------------------------------------

SEED = torch.tensor([12345])
INT8_CASES = {  # op -> (its arguments after x, the parameters its form reads)
    "luq": ((SEED, 4, "strict"), {"bits": 4, "levels": "strict"}),
    "luq3": ((SEED, 3, "strict"), {"bits": 3, "levels": "strict"}),
    "sr": ((SEED, 4), {"bits": 4}),
    "sr8": ((SEED, 8), {"bits": 8}),
    "sawb": ((4,), {"bits": 4}),
    "absmax": ((8,), {"bits": 8}),
    "absmax4": ((4,), {"bits": 4}),
}


def test_every_op_with_int8_codes_has_cases():
    assert {case.rstrip("0123456789") for case in INT8_CASES} == {s.name for s in OPS.values() if s.int8_op}


def inputs(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(48, 40, generator=g) * 3
    return [x.to(dtype), x.t().to(dtype), torch.relu(x).to(dtype), torch.zeros(5, 8, dtype=dtype)]


@pytest.mark.parametrize("case", sorted(INT8_CASES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_codes_times_scale_are_the_quantized_values(case, dtype):
    name = case.rstrip("0123456789")
    spec, (args, params) = OPS[name], INT8_CASES[case]
    value_op, codes_op = getattr(torch.ops.nm, name), getattr(torch.ops.nm, spec.int8_op)
    for x in inputs(dtype):
        q = value_op(x, *args)
        c, scale = codes_op(x, *args)
        assert c.dtype == torch.int8 and c.stride() == torch.empty_like(x).stride() and scale.dtype == torch.float32
        assert torch.equal((c.float() * scale).to(dtype), q), (case, dtype)
        assert c.abs().max() <= spec.form(params).max_code
        if not x.any():
            assert not c.any() and scale == 1


@pytest.mark.parametrize("case", ["luq", "sr", "sr8"])
def test_stochastic_codes_portable_path_equals_the_cpu_kernel(case):
    name = case.rstrip("0123456789")
    spec, (args, params) = OPS[name], INT8_CASES[case]
    for dtype in DTYPES:
        for x in inputs(dtype):
            c, scale = getattr(torch.ops.nm, spec.int8_op)(x, *args)
            expected_scale = spec.scale(x, **params)
            portable = int8_codes(ops._stochastic_torch(spec, x, args[0], params), expected_scale)
            assert torch.equal(scale, expected_scale) and torch.equal(c, portable), (case, dtype)


def _multipliers(x: torch.Tensor) -> list:
    """Multipliers that broadcast to x: along its last dim, along its first, per element, one number; positive
    and spread over 2^±6 like forward scales, with one zero (a row of scales of an all-zero row)."""
    g = torch.Generator().manual_seed(5)
    rows, cols = x.shape

    def spread(*shape):
        return torch.exp2(torch.rand(*shape, generator=g) * 12 - 6)

    along_last = spread(1, cols)
    along_last[0, 1] = 0
    return [along_last, spread(rows, 1), spread(rows, cols), spread(())]


@pytest.mark.parametrize("case", ["luq", "sr8"])
@pytest.mark.parametrize("dim", [None, 0, 1])
def test_codes_of_x_times_a_multiplier_are_the_codes_of_the_fp32_product(case, dim):
    """``times`` (the fold of per-row forward scales into the gradient): the CPU kernel forms x·times as it
    reads x and gives, bit for bit, the codes and scales of x.float() * times quantized as an fp32 tensor,
    on every input dtype and layout and on the portable path too."""
    name = case.rstrip("0123456789")
    spec, (args, params) = OPS[name], INT8_CASES[case]
    codes_op = getattr(torch.ops.nm, spec.int8_op)
    own = (*args, dim)  # u, the op's arguments, dim
    for dtype in DTYPES:
        for x in inputs(dtype)[:2]:
            for times in _multipliers(x):
                c, scale = codes_op(x, *own, times=times)
                product = x.float() * times
                assert product.dtype == torch.float32
                c_ref, scale_ref = codes_op(product, *own)
                assert torch.equal(c, c_ref) and torch.equal(scale, scale_ref), (case, dim, dtype, times.shape)
                assert c.stride() == torch.empty_like(x).stride()
                given = {**params, "dim": dim}
                values = ops._stochastic_torch(spec, product, args[0], given)
                portable = int8_codes(values, spec.scale(product, **given))
                assert torch.equal(c, portable), (case, dim, dtype, times.shape)


def test_a_multiplier_that_does_not_fit_is_refused_naming_it():
    x = torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"times of shape \(6,\) does not broadcast to x's shape \(6, 4\)"):
        torch.ops.nm.sr_int8(x, SEED, 8, 1, times=torch.ones(6))
    with pytest.raises(ValueError, match="times must be a float32 tensor on cpu, got torch.float64"):
        torch.ops.nm.sr_int8(x, SEED, 8, 1, times=torch.ones(1, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"times of shape \(2, 6, 4\) does not broadcast"):  # it would grow x
        torch.ops.nm.luq_int8(x, SEED, 4, "strict", None, times=torch.ones(2, 6, 4))


@pytest.mark.parametrize("special", [float("nan"), float("inf")])
def test_codes_of_non_finite_inputs_are_zero_with_a_non_finite_scale(special):
    x = torch.randn(8, 8)
    x[2, 3] = special
    for name, args, params in (("luq", (SEED, 4, "strict"), {"bits": 4, "levels": "strict"}),
                               ("sr", (SEED, 4), {"bits": 4}), ("sawb", (4,), None), ("absmax", (8,), None)):
        c, scale = getattr(torch.ops.nm, OPS[name].int8_op)(x, *args)
        assert not c.any() and not torch.isfinite(scale), name
        assert torch.isnan(c.float() * scale).all()  # non-finite everywhere, as the values are
        if params is not None:  # the portable path's scale too
            assert not torch.isfinite(OPS[name].scale(x, **params)), name


def test_forms_without_int8_codes_are_refused_with_the_reason():
    x = torch.randn(8, 8)
    with pytest.raises(ValueError, match="mean of smp=2 samples"):
        torch.ops.nm.luq_int8(x, torch.tensor([1, 2]), 4, "strict")
    with pytest.raises(ValueError, match="codes reach 128, above int8's 127"):
        torch.ops.nm.luq_int8(x, SEED, 4, "reference")
    with pytest.raises(ValueError, match="codes reach 16384"):
        torch.ops.nm.luq_int8(x, SEED, 5, "strict")
    assert OPS["luq"].form({"bits": 4, "levels": "strict"}).int8
    assert OPS["sawb"].form({"bits": 4}).int8 and OPS["sr"].form({"bits": 8}).int8
    assert OPS["absmax"].form({"bits": 8}).int8 and OPS["absmax"].form({"bits": 8}).float8 is None


# -- absmax ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [4, 8])
def test_absmax_is_round_to_nearest_on_an_exact_unclipped_grid(dtype, bits):
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(64, 33, generator=g) * torch.logspace(-3, 3, 33)).to(dtype)
    q = torch.ops.nm.absmax(x, bits)
    xd = x.double()
    scale = sr_scale(xd.abs().max().float(), dtype, bits).double()
    levels = sr_levels(bits)
    assert scale * levels >= xd.abs().max()  # the scale is rounded up: nothing clipped
    # the nearest level, half to even (float64 reference)
    reference = torch.round(xd / scale).clamp(-levels, levels) * scale
    assert torch.equal(q.double(), reference)
    assert ((q.double() - xd).abs() <= scale / 2).all()
    assert torch.equal(q, absmax_math(x, bits)[0]), "the CPU kernel and the portable math agree"
    if dtype == torch.bfloat16 and bits == 8:  # bf16 holds 8-bit codes exactly only at a power-of-two scale
        assert torch.frexp(torch.tensor(float(scale)))[0] == 0.5


def test_absmax_gradient_is_straight_through_and_bits_are_checked():
    x = torch.randn(6, 5, requires_grad=True)
    torch.ops.nm.absmax(x, 8).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    with pytest.raises(ValueError, match="bits must be in 2..8, got bits=9"):
        torch.ops.nm.absmax(torch.randn(3), 9)


@pytest.mark.parametrize("op,args", [
    ("int8_mm", lambda: (torch.randint(-127, 128, (8, 16), dtype=torch.int8), torch.tensor(0.5),
                         torch.randint(-127, 128, (16, 4), dtype=torch.int8), torch.tensor(0.25), torch.randn(4),
                         torch.float32)),
    ("absmax", lambda: (torch.randn(5, 7, requires_grad=True), 8)),
    ("absmax_int8", lambda: (torch.randn(5, 7), 8)),
    ("sawb_int8", lambda: (torch.randn(5, 7), 4)),
    ("luq_int8", lambda: (torch.randn(5, 7).t(), torch.tensor([3]), 4, "strict")),
    ("sr_int8", lambda: (torch.randn(5, 7), torch.rand(1, 5, 7), 4)),
    ("sr_int8", lambda: (torch.randn(7, 5).t(), torch.tensor([3]), 8, 1, False, torch.rand(1, 7) + 0.5)),
    ("sr_int8", lambda: (torch.randn(7, 5).t(), torch.tensor([3]), 8, 1, True, torch.rand(1, 7) + 0.5)),
    ("absmax_int8", lambda: (torch.randn(5, 7), 8, 0, True)),
    ("luq_int8", lambda: (torch.randn(5, 7), torch.tensor([3]), 4, "strict", None, torch.rand(5, 1) + 0.5)),
])
def test_opcheck(op, args):
    # int8 tensors: opcheck's schema test does arithmetic on them that int8 has
    torch.library.opcheck(getattr(torch.ops.nm, op).default, args())


@pytest.mark.skipif(not __import__("nmcompile.kernels.cpu", fromlist=["available"]).available(),
                    reason="needs the CPU kernels")
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_eager_scaling_pass_equals_the_graphs_scaling(dtype):
    """nm.int8_mm on CPU scales in one C++ pass; graphs inline int8.scaled_sums for Inductor to fuse: the
    same bits, bias broadcast as a row or as a full matrix, on sums beyond fp32's integers and near ties."""
    from nmcompile.kernels import cpu
    from nmcompile.kernels.int8 import scaled_sums

    g = torch.Generator().manual_seed(5)
    sums = torch.randint(-2**31 + 1, 2**31 - 1, (37, 53), generator=g, dtype=torch.int32)
    sums[0, :8] = torch.tensor([2**30 + 2**22 + 1, -(2**30 + 2**22 + 1), 2**24 + 1, 1, -1, 0, 2**31 - 1, 7])
    sa, sb = torch.tensor(2.0**-15), torch.rand((), generator=g) + 0.5
    for bias in (None, torch.randn(53, generator=g).to(dtype), torch.randn(37, 53, generator=g).to(dtype)):
        eager = cpu.int8_scale(sums, float(sa) * float(sb), bias, dtype)
        assert torch.equal(eager, scaled_sums(sums, sa, sb, bias, dtype)), (dtype, None if bias is None else bias.dim())

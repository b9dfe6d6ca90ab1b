"""lowering="native" kernels: exact float8 codes, the FP8 / 2:4 GEMM ops, and where a device runs them.

The bounds are the textbook ones for a K-term fp32 dot product: |fl(Σ) - Σ| ≤ γ_K Σ|a_i b_i| with
γ_K = K·u / (1 - K·u), u = 2^-24, plus one rounding per scale multiplication (u) and the rounding
of the output to its dtype (half an ulp of it).
"""
from __future__ import annotations

import pytest
import torch

from nmcompile.kernels import gemm
from nmcompile.kernels.fp8 import E4M3, E5M2, dequantize, luq_format
from nmcompile.kernels.luq import luq_levels
from nmcompile.kernels.sawb import scale_bits

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
U = 2.0**-24


def gamma(k: int) -> float:
    return k * U / (1 - k * U)


def bits_of(x: torch.Tensor) -> torch.Tensor:
    return x.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[x.dtype])


# -- exact codes ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_sawb_codes_times_scale_are_the_sawb_output_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(1)
    for x in (torch.randn(64, 48, generator=g), torch.randn(64, 48, generator=g).relu(), torch.zeros(3, 4),
              torch.randn(40, 32, generator=g).t() * 1e-3):
        x = x.to(dtype)
        q = torch.ops.nm.sawb(x, 4)
        codes, scale = torch.ops.nm.sawb_fp8(x, 4)
        assert codes.dtype == E4M3 and scale.dtype == torch.float32 and scale.dim() == 0
        assert codes.stride() == torch.empty_like(x).stride()
        assert torch.equal(bits_of(dequantize(codes, scale, dtype)), bits_of(q))
        # integer codes of one scale with p - b significant bits (sawb.py)
        k = codes.float()
        assert torch.equal(k, k.round()) and k.abs().max() <= 15
        keep = scale_bits(dtype, 4)
        mantissa, _ = torch.frexp(scale)
        assert mantissa * 2**keep == torch.round(mantissa * 2**keep)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "bits,levels",
    [(4, "strict"), (4, "reference"), (5, "strict"), (5, "reference"), (6, "strict"), (6, "reference"), (2, "strict")],
)
def test_luq_codes_times_scale_are_the_luq_output_bit_for_bit(dtype, bits, levels):
    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(96, 40, generator=g) * torch.rand(96, 1, generator=g) * 4).to(dtype)
    seed = torch.tensor([12345])
    y = torch.ops.nm.luq(x, seed, bits, levels)
    codes, scale = torch.ops.nm.luq_fp8(x, seed, bits, levels)
    assert codes.dtype == (E4M3 if bits <= 5 else E5M2)
    assert torch.equal(bits_of(dequantize(codes, scale, dtype)), bits_of(y))
    nonzero = codes.float().abs()[codes.float() != 0]
    assert torch.equal(torch.exp2(torch.log2(nonzero).round()), nonzero), "codes are powers of two"


def test_luq_codes_of_degenerate_tensors():
    seed = torch.tensor([3])
    codes, scale = torch.ops.nm.luq_fp8(torch.zeros(4, 8), seed, 4, "strict")
    assert torch.equal(codes.float(), torch.zeros(4, 8)) and scale == 1
    x = torch.randn(4, 8)
    x[1, 2] = float("inf")
    codes, scale = torch.ops.nm.luq_fp8(x, seed, 4, "strict")
    assert not torch.isfinite(codes.float() * scale).all(), "non-finite gradients stay non-finite"


def test_formats_that_are_not_exact_are_refused():
    assert luq_format(luq_levels(4, "strict") - 1, 1)[0] is E4M3
    assert luq_format(luq_levels(5, "reference") - 1, 1)[0] is E4M3  # 2^-9 .. 2^8: 18 powers of two
    assert luq_format(luq_levels(6, "reference") - 1, 1)[0] is E5M2  # 2^-16 .. 2^15: 32
    fmt, why = luq_format(luq_levels(7, "strict") - 1, 1)
    assert fmt is None and "6 bits" in why
    fmt, why = luq_format(3, 2)
    assert fmt is None and "smp=2" in why
    with pytest.raises(ValueError, match="smp=2"):
        torch.ops.nm.luq_fp8(torch.randn(4, 4), torch.tensor([1, 2]), 4, "strict")
    with pytest.raises(ValueError, match="6 bits"):
        torch.ops.nm.luq_fp8(torch.randn(4, 4), torch.tensor([1]), 7, "strict")


# -- the GEMMs --------------------------------------------------------------------------------
def random_codes(shape, g, fmt=E4M3) -> torch.Tensor:
    levels = torch.tensor([0.0, 1, 2, 3, 4, 6, 8, 12, 16, 0.5, 0.25], dtype=torch.float32)
    pick = levels[torch.randint(0, len(levels), shape, generator=g)]
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    return (pick * sign).to(fmt)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["row-major", "transposed"])
def test_fp8_mm_is_the_exact_product_within_the_fp32_bound(out_dtype, layout):
    g = torch.Generator().manual_seed(7)
    m, k, n = 24, 200, 40
    a, b = random_codes((m, k), g), random_codes((k, n), g)
    if layout == "transposed":
        a, b = a.t().contiguous().t(), b.t().contiguous().t()
    sa, sb = torch.tensor(0.3017), torch.tensor(1.7e-3)
    bias = torch.randn(n, generator=g).to(out_dtype)
    out = torch.ops.nm.fp8_mm(a, sa, b, sb, bias, out_dtype)
    exact = (a.double() * sa.double()) @ (b.double() * sb.double()) + bias.double()
    absprod = (a.double().abs() * sa.double()) @ (b.double().abs() * sb.double())
    half_ulp = 0.5 * torch.finfo(out_dtype).eps
    bound = gamma(k) * absprod + 3 * U * exact.abs() + half_ulp * exact.abs() * (1 + 4 * U) + 1e-30
    assert out.dtype == out_dtype and out.shape == (m, n)
    assert ((out.double() - exact).abs() <= bound).all()


def test_fp8_mm_takes_e5m2_times_e4m3():
    g = torch.Generator().manual_seed(2)
    a, b = random_codes((8, 32), g, E5M2), random_codes((32, 16), g)
    out = torch.ops.nm.fp8_mm(a, torch.tensor(1.0), b, torch.tensor(1.0), None, torch.float32)
    assert torch.equal(out, a.float() @ b.float())  # small integer products: exact in fp32


def test_fp8_mm_rejects_what_it_cannot_scale():
    a = torch.zeros(4, 16, dtype=E4M3)
    with pytest.raises(ValueError, match="float8 codes"):
        torch.ops.nm.fp8_mm(a, torch.tensor(1.0), torch.zeros(16, 4), torch.tensor(1.0), None, torch.float32)
    with pytest.raises(ValueError, match="scale_b must be one fp32 value"):
        torch.ops.nm.fp8_mm(a, torch.tensor(1.0), a.t(), torch.ones(4), None, torch.float32)


def pruned_24(shape, g, dtype=torch.float32) -> torch.Tensor:
    x = torch.randn(shape, generator=g)
    return torch.ops.nm.mvue(x, torch.tensor(5), 2, 4, 1).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse24_mm_equals_the_dense_product_of_the_pruned_operand(dtype):
    g = torch.Generator().manual_seed(3)
    a, b = pruned_24((32, 64), g, dtype), torch.randn(64, 24, generator=g).to(dtype)
    assert torch.equal(torch.ops.nm.sparse24_mm(a, b, None, None, dtype), a @ b)


def test_sparse24_mm_in_fp8_equals_fp8_mm():
    g = torch.Generator().manual_seed(4)
    a, _ = torch.ops.nm.luq_fp8(pruned_24((32, 64), g), torch.tensor([9]), 4, "strict")
    b = random_codes((64, 24), g)
    sa, sb = torch.tensor(0.5), torch.tensor(0.125)
    assert torch.equal(
        torch.ops.nm.sparse24_mm(a, b, sa, sb, torch.bfloat16), torch.ops.nm.fp8_mm(a, sa, b, sb, None, torch.bfloat16)
    )


def test_sparse24_mm_names_the_group_that_breaks_the_structure():
    a = torch.zeros(4, 8)
    a[2, 4:7] = 1.0  # three nonzeros in columns 4..6 of row 2
    with pytest.raises(ValueError, match=r"row 2, columns 4\.\.7 hold 3 nonzeros"):
        torch.ops.nm.sparse24_mm(a, torch.randn(8, 4), None, None, torch.float32)
    codes = a.to(E4M3)
    with pytest.raises(ValueError, match="row 2"):
        torch.ops.nm.sparse24_mm(codes, codes.t().contiguous(), torch.tensor(1.0), torch.tensor(1.0), torch.float32)
    with pytest.raises(ValueError, match="K=6 is not a multiple of 4"):
        torch.ops.nm.sparse24_mm(torch.zeros(4, 6), torch.zeros(6, 4), None, None, torch.float32)
    neg_zero = torch.full((2, 4), -0.0)
    neg_zero[:, :2] = 1.0  # -0 is a zero
    torch.ops.nm.sparse24_mm(
        neg_zero.to(E4M3), torch.zeros(4, 2, dtype=E4M3), torch.tensor(1.0), torch.tensor(1.0), torch.float32
    )


def test_gemm_ops_pass_opcheck():
    g = torch.Generator().manual_seed(5)
    a, b = random_codes((16, 32), g), random_codes((32, 16), g)
    one = torch.tensor(1.0)
    # opcheck's schema test does arithmetic on every tensor argument, which float8 lacks on CPU
    no_schema = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(
        torch.ops.nm.fp8_mm.default, (a, one, b, one, torch.randn(16), torch.float32), test_utils=no_schema
    )
    torch.library.opcheck(
        torch.ops.nm.sparse24_mm.default, (pruned_24((16, 32), g), torch.randn(32, 8), None, None, torch.float32)
    )
    torch.library.opcheck(torch.ops.nm.sawb_fp8.default, (torch.randn(6, 8), 4))
    torch.library.opcheck(torch.ops.nm.luq_fp8.default, (torch.randn(6, 8), torch.tensor([3]), 4, "strict"))


# -- where a device runs them ---------------------------------------------------------------------
CUDA = torch.device("cuda", 0)


def support(name, *args):
    return gemm.KERNELS[name].support(*args)


def test_native_support_on_cpu_and_cuda(monkeypatch):
    cpu = torch.device("cpu")
    # FP8 on CPU is a scalar reference: only inside cpu_reference_kernels(), as tests run it
    assert "scalar reference" in support("fp8", cpu, None, (3, 5, 7), torch.float32)
    assert "scalar reference" in support("2:4 fp8", cpu, None, (32, 32, 32), torch.bfloat16)
    with gemm.cpu_reference_kernels():
        assert support("fp8", cpu, None, (3, 5, 7), torch.float32) is None
    # the 2:4 product on CPU is a dense GEMM after a structure check: native only
    assert support("2:4", cpu, None, (3, 5, 8), torch.float32) is None
    assert "lowering='native'" in gemm.KERNELS["2:4"].support(cpu, None, (3, 5, 8), torch.float32, "auto")
    # int8: where the CPU has VNNI or AMX and the probe found torch._int_mm exact
    assert support("int8", cpu, None, (3, 5, 7), torch.float32) == gemm.int8_cpu_support()
    monkeypatch.setattr(gemm, "_int8_on_cpu", "no VNNI")
    assert support("int8", cpu, None, (3, 5, 7), torch.float32) == "no VNNI"
    monkeypatch.undo()
    assert "8.0" in support("int8", CUDA, (7, 5), (64, 64, 64), torch.bfloat16)
    assert support("int8", CUDA, (8, 0), (64, 64, 64), torch.float32) is None
    assert "M > 16" in support("int8", CUDA, (8, 0), (16, 64, 64), torch.float32)
    assert "K, N multiples of 8" in support("int8", CUDA, (8, 6), (64, 64, 60), torch.float32)
    assert "8.9" in support("fp8", CUDA, (8, 0), (64, 64, 64), torch.bfloat16)
    assert support("fp8", CUDA, (9, 0), (64, 64, 64), torch.bfloat16) is None
    assert "K=24" in support("fp8", CUDA, (9, 0), (64, 64, 24), torch.bfloat16)
    monkeypatch.setattr(gemm, "cusparselt_version", lambda: None)
    assert "cuSPARSELt is not available" in support("2:4", CUDA, (9, 0), (64, 64, 64), torch.bfloat16)
    monkeypatch.setattr(gemm, "cusparselt_version", lambda: 800)
    assert support("2:4", CUDA, (9, 0), (64, 64, 64), torch.bfloat16) is None
    assert "bf16/fp16" in support("2:4", CUDA, (9, 0), (64, 64, 64), torch.float32)
    assert "bf16/fp16 outputs" in support("2:4 fp8", CUDA, (9, 0), (64, 64, 64), torch.float32)
    assert "8.9" in support("2:4 fp8", CUDA, (8, 0), (64, 64, 64), torch.bfloat16)
    assert "M >= 32" in support("2:4 fp8", CUDA, (9, 0), (16, 64, 64), torch.bfloat16)
    assert "K >= 16 and a multiple" in support("2:4", CUDA, (9, 0), (64, 64, 40), torch.bfloat16)
    assert "7.5" in support("2:4", CUDA, (7, 5), (64, 64, 64), torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8_mm_on_cuda_matches_cpu():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need CUDA capability >= 8.9")
    g = torch.Generator().manual_seed(6)
    a, b = random_codes((256, 512), g), random_codes((512, 128), g)
    sa, sb = torch.tensor(0.25), torch.tensor(0.5)
    cpu_out = torch.ops.nm.fp8_mm(a, sa, b, sb, None, torch.bfloat16)
    cuda_out = torch.ops.nm.fp8_mm(a.cuda(), sa.cuda(), b.cuda(), sb.cuda(), None, torch.bfloat16)
    torch.testing.assert_close(cuda_out.cpu(), cpu_out, rtol=2**-8, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sparse24_mm_on_cuda_is_the_product_of_the_pruned_operand():
    if gemm.cusparselt_version() is None or torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("2:4 GEMMs need cuSPARSELt and CUDA capability >= 8.0")
    g = torch.Generator().manual_seed(6)
    m, k, n = 256, 512, 128
    p = pruned_24((m, k), g, torch.bfloat16)
    d = torch.randn(k, n, generator=g).bfloat16()
    ref = p.float() @ d.float()
    out = torch.ops.nm.sparse24_mm(p.cuda(), d.cuda(), None, None, torch.bfloat16).cpu().float()
    assert ((out - ref).abs() <= gamma(k) * (p.float().abs() @ d.float().abs()) + 2**-8 * ref.abs()).all()


def test_a_failing_native_kernel_falls_back_to_the_same_result_with_one_warning():
    from nmcompile.kernels import cuda

    def broken():
        raise RuntimeError("CUDA error: no kernel image is available")

    with pytest.warns(RuntimeWarning, match="nmcompile: a test kernel failed here.*no kernel image"):
        assert cuda.or_reference(broken, lambda: torch.ones(2), "a test kernel").tolist() == [1.0, 1.0]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once is enough
        assert cuda.or_reference(broken, lambda: torch.zeros(1), "a test kernel").tolist() == [0.0]

"""The Triton kernels of ``kernels/cuda.py`` give the bits of the torch math.

Without a GPU they run in Triton's CPU interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1``
before anything imports Triton); on a GPU (``-m cuda``) the same comparisons run on the device
against the CPU results. Layouts, specials and patterns as for the CPU kernels.
"""
from __future__ import annotations

import os

import pytest
import torch

from nmcompile.kernels import cuda
from nmcompile.kernels.grouping import uniform_shape
from nmcompile.kernels.luq import luq_levels
from tests.kernels.test_cpu_kernels import layouts, same

pytestmark = [pytest.mark.triton, pytest.mark.skipif(not cuda.available(), reason="needs Triton (pip install triton)")]
ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def on(t):
    return t.to(DEVICE) if isinstance(t, torch.Tensor) else t


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.cpu().view(torch.uint8), b.cpu().view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (1, 4), (3, 4)])
def test_prune_kernel_gives_the_bits_of_the_torch_math(dtype, n, m):
    for name, x, dims in layouts(dtype, seed=n * 10 + m):
        for dim in dims:
            u = torch.rand(uniform_shape(x.shape, m, dim), generator=torch.Generator().manual_seed(dim))
            y = cuda.prune(on(x), on(u), n, m, dim, mvue=True)
            assert same(y.cpu(), torch.ops.nm.mvue(x, u, n, m, dim)), (name, dim)
            assert y.stride() == torch.empty_like(x).stride(), name
            seed = torch.tensor(2**61 + 12345)
            assert same(
                cuda.prune(on(x), on(seed), n, m, dim, mvue=True).cpu(), torch.ops.nm.mvue(x, seed, n, m, dim)
            ), (name, dim)
            assert same(cuda.prune(on(x), None, n, m, dim, mvue=False).cpu(), torch.ops.nm.greedy(x, n, m, dim)), (
                name,
                dim,
            )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "bits,levels,samples",
    [(4, "strict", 1), (4, "reference", 2), (5, "strict", 1), (2, "strict", 1), (6, "reference", 1)],
)
def test_luq_kernel_gives_the_bits_of_the_torch_math(dtype, bits, levels, samples):
    top = luq_levels(bits, levels) - 1
    for name, x, _ in layouts(dtype, seed=bits):
        finite = torch.nan_to_num(x, nan=0.0, posinf=0.0)
        # Triton 3.9's interpreter loads bf16 subnormals wrongly (8.54e-39 reads as 5.33e-39); GPUs do not
        tiny = [] if dtype == torch.bfloat16 and not ON_GPU else [finite * 1e-38]
        for t in (x, finite, *tiny, torch.zeros_like(x)):
            seeds = torch.tensor([7, 2**62 - 1][:samples])
            assert same(cuda.luq(on(t), on(seeds), top).cpu(), torch.ops.nm.luq(t, seeds, bits, levels)), name
            u = torch.rand(samples, *t.shape, generator=torch.Generator().manual_seed(3))
            assert same(cuda.luq(on(t), on(u), top).cpu(), torch.ops.nm.luq(t, u, bits, levels)), name
            # codes of levels below the dtype's subnormals are exact, the dtype's values not (fp8.py)
            exact_in_dtype = not (dtype == torch.float16 and bits >= 6)
            if samples == 1 and exact_in_dtype and (t is finite or not t.any()):
                fmt = torch.float8_e4m3fn if bits <= 5 else torch.float8_e5m2
                codes, scale = cuda.luq(on(t), on(seeds), top, codes=fmt)
                ref_codes, ref_scale = torch.ops.nm.luq_fp8(t, seeds, bits, levels)
                assert bits_equal(codes, ref_codes) and same(scale.cpu(), ref_scale), name
                assert codes.stride() == ref_codes.stride()
            if samples == 1 and bits <= 4 and levels == "strict":  # the int8 codes, non-finite inputs included
                codes, scale = cuda.luq(on(t), on(seeds), top, codes=torch.int8)
                ref_codes, ref_scale = torch.ops.nm.luq_int8(t, seeds, bits, levels)
                assert torch.equal(codes.cpu(), ref_codes) and same(scale.cpu(), ref_scale), name
                assert codes.stride() == ref_codes.stride()
        if not x.isfinite().all():
            codes, _ = cuda.luq(on(x), on(torch.tensor([7])), luq_levels(4, "strict") - 1, codes=torch.float8_e4m3fn)
            assert codes.float().isnan().all(), "non-finite gradients give NaN codes everywhere"


@pytest.mark.parametrize("dtype", DTYPES)
def test_sawb_kernel_gives_the_levels_of_the_op(dtype):
    for name, x, _ in layouts(dtype, seed=5):
        finite = torch.nan_to_num(x, nan=0.0, posinf=0.0)
        for t in (finite, finite.abs(), torch.zeros_like(x), x):
            q, scale = cuda.sawb(on(t), 4)
            assert same(q.cpu(), torch.ops.nm.sawb(t, 4)), name
            codes, code_scale = cuda.sawb(on(t), 4, codes=torch.float8_e4m3fn)
            ref_codes, ref_scale = torch.ops.nm.sawb_fp8(t, 4)
            assert bits_equal(codes, ref_codes) and same(code_scale.cpu(), ref_scale), name
            codes, code_scale = cuda.sawb(on(t), 4, codes=torch.int8)
            ref_codes, ref_scale = torch.ops.nm.sawb_int8(t, 4)
            assert torch.equal(codes.cpu(), ref_codes) and same(code_scale.cpu(), ref_scale), name


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_ops_dispatch_to_the_triton_kernels_on_cuda():
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    seed = torch.tensor(5, device="cuda")
    assert same(torch.ops.nm.mvue(x, seed, 2, 4, 1).cpu(), torch.ops.nm.mvue(x.cpu(), seed.cpu(), 2, 4, 1))
    seeds = torch.tensor([9], device="cuda")
    codes, scale = torch.ops.nm.luq_fp8(x, seeds, 4, "strict")
    ref_codes, ref_scale = torch.ops.nm.luq_fp8(x.cpu(), seeds.cpu(), 4, "strict")
    assert bits_equal(codes, ref_codes) and torch.equal(scale.cpu(), ref_scale)

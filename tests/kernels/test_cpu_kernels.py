"""The CPU kernels (kernels/nm_cpu.cpp) against the portable torch math they follow.

MVUE, greedy and LUQ must give the same bits as ``sparsity.mvue_math`` / ``greedy_math`` /
``luq.luq_math`` (same fp32 operations in the same order, no FMA contraction): for every dtype,
memory layout, N:M pattern (M = 2, 4, 8 have compiled-in group sizes, others the generic path),
explicit uniforms and seeds, and for non-finite, zero and denormal values. SAWB takes its moments
in double where the torch math uses fp32, so its scale may differ in the last bit: within a few
fp32 ulps of the float64 reference, and finite where the fp32 moments would overflow.
"""
from __future__ import annotations

import pytest
import torch

from nmcompile.kernels import cpu, ops
from nmcompile.kernels import reference as ref
from nmcompile.kernels.grouping import uniform_shape
from nmcompile.kernels.luq import luq_math
from nmcompile.kernels.random import uniform
from nmcompile.kernels.sawb import SAWB_COEFFICIENTS
from nmcompile.kernels.sparsity import greedy_math, mvue_math

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"CPU kernels not built: {cpu.failure()}")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PATTERNS = [(1, 2), (2, 4), (3, 8), (2, 5), (1, 3)]


def layouts(dtype, seed):
    """(name, tensor, grouped dims): contiguous, transposed (a wgrad operand), a permuted 4-D
    tensor (channels-last-like), a strided slice (not dense), with zeros and specials mixed in."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 40, 36, generator=g) * torch.rand(6, 40, 36, generator=g).pow(4) * 4
    base.view(-1)[::7] = 0.0
    base.view(-1)[5] = 1e-41  # denormal
    base[3, 8, :] = float("nan")
    base[4, :, 9] = float("inf")
    yield "contiguous", base.to(dtype), (0, 1, 2)
    yield "transposed", base[0].to(dtype).t(), (0, 1)
    four = base.reshape(6, 4, 10, 36).to(dtype).permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    yield "permuted", four, (0, 1, 2, 3)
    yield "strided", base.to(dtype)[:, ::2, 1:], (1, 2)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", PATTERNS)
def test_pruning_kernels_give_the_bits_of_the_torch_math(dtype, n, m):
    for name, x, dims in layouts(dtype, seed=n * 10 + m):
        for dim in dims:
            shape = uniform_shape(x.shape, m, dim)
            u = torch.rand(shape, generator=torch.Generator().manual_seed(dim))
            u.view(-1)[:3] = torch.tensor([0.0, 1 - 2**-24, 0.5])[: u.numel()]  # the extremes of [0, 1)
            y = torch.ops.nm.mvue(x, u, n, m, dim)
            assert same(y, mvue_math(x, u, n, m, dim)), (name, dim)
            assert y.stride() == torch.empty_like(x).stride(), "output keeps x's layout (as the fake kernel says)"
            seed = torch.tensor(2**61 + 12345)
            assert same(torch.ops.nm.mvue(x, seed, n, m, dim), mvue_math(x, uniform(seed, shape, "cpu"), n, m, dim)), (
                name,
                dim,
            )
            assert same(torch.ops.nm.greedy(x, n, m, dim), greedy_math(x, n, m, dim)), (name, dim)


def test_explicit_uniforms_of_any_strides():
    x = torch.randn(8, 12, 16)
    u = torch.rand(16, 8, 3).permute(1, 2, 0)  # uniform_shape (8, 16, 3) seen through other strides
    u = u.permute(0, 2, 1)
    assert not u.is_contiguous() and u.shape == uniform_shape(x.shape, 4, 1)
    assert same(torch.ops.nm.mvue(x, u, 2, 4, 1), mvue_math(x, u.contiguous(), 2, 4, 1))
    v = torch.rand(2, 16, 12, 8).permute(0, 3, 2, 1)
    assert same(torch.ops.nm.luq(x, v, 4, "strict"), luq_math(x, v.contiguous(), 4, "strict"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,levels", [(2, "strict"), (4, "strict"), (4, "reference"), (8, "reference")])
@pytest.mark.parametrize("samples", [1, 3])
def test_luq_kernel_gives_the_bits_of_the_torch_math(dtype, bits, levels, samples):
    for name, x, _ in layouts(dtype, seed=bits):
        finite = torch.nan_to_num(x, nan=0.0, posinf=0.0)  # a NaN/Inf anywhere makes all of LUQ non-finite
        for t in (x, finite, finite * 1e-38, torch.zeros_like(x)):
            u = torch.rand(samples, *t.shape, generator=torch.Generator().manual_seed(samples))
            assert same(torch.ops.nm.luq(t, u, bits, levels), luq_math(t, u, bits, levels)), name
            seeds = torch.tensor([7, 2**62 - 1, 12345][:samples])
            stacked = torch.stack([uniform(s, t.shape, "cpu") for s in seeds])
            assert same(torch.ops.nm.luq(t, seeds, bits, levels), luq_math(t, stacked, bits, levels)), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_sawb_kernel_matches_the_float64_reference(dtype):
    c1, c2 = SAWB_COEFFICIENTS[4]
    for name, x, _ in layouts(dtype, seed=3):
        x = torch.nan_to_num(x, nan=0.0, posinf=0.0)
        y = torch.ops.nm.sawb(x, 4)
        # same levels; the value level·scale within a few fp32 ulps (scale from double moments)
        # plus the rounding to x's dtype
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(y.double(), ref.sawb_reference(x, 4, c1, c2).double(), rtol=4 * eps, atol=0)
        assert y.stride() == torch.empty_like(x).stride(), name


def test_sawb_stays_finite_where_fp32_moments_overflow():
    x = torch.tensor([3e38, -1e38, 0.0, 1.0])
    y = torch.ops.nm.sawb(x, 4)
    assert torch.isfinite(y).all() and y[0] > 0 and y[1] < 0


def test_torch_math_fallback_gives_the_same_bits(monkeypatch):
    x = torch.randn(64, 48).t()
    seed, seeds = torch.tensor(99), torch.tensor([3, 4])
    fast = [
        torch.ops.nm.mvue(x, seed, 2, 4, 1),
        torch.ops.nm.greedy(x, 2, 4, 0),
        torch.ops.nm.luq(x, seeds, 4, "strict"),
    ]
    monkeypatch.setattr(ops, "_on_cpu_kernels", lambda *a: False)
    slow = [
        torch.ops.nm.mvue(x, seed, 2, 4, 1),
        torch.ops.nm.greedy(x, 2, 4, 0),
        torch.ops.nm.luq(x, seeds, 4, "strict"),
    ]
    for a, b in zip(fast, slow):
        assert same(a, b) and a.stride() == b.stride()


def test_integer_u_must_be_int64_seeds_of_the_right_shape():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"int64 seeds of shape \(\)"):
        torch.ops.nm.mvue(x, torch.tensor([1, 2]), 2, 4, 1)
    with pytest.raises(ValueError, match="int64 seeds"):
        torch.ops.nm.luq(x, torch.tensor(1, dtype=torch.int32), 4, "strict")


# -- the ctypes signatures: read from the C++ declarations, checked at each call ----------------------------------

def test_signatures_are_read_from_the_c_declarations():
    import ctypes

    source = '''extern "C" {
void nm_plain(int dtype, const void* x, int64_t n, double c, const int64_t* strides) { body(); }
#define ENTRY(name) \\
  void nm_##name(int dtype, float* out, \\
                 int threads) { name(out); }
ENTRY(one)
ENTRY(two)
}  // extern "C"
'''
    found = cpu.signatures(source)
    assert found == {"nm_plain": [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_void_p],
                     "nm_one": [ctypes.c_int, ctypes.c_void_p, ctypes.c_int],
                     "nm_two": [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]}
    with pytest.raises(RuntimeError, match=r"no ctypes type for parameter 'float scale'"):
        cpu.signatures(source.replace("double c", "float scale"))
    assert set(cpu.STOCHASTIC) <= set(cpu.SIGNATURES)  # every stochastic quantizer of the catalog has its entry


def test_every_call_passes_the_declared_number_of_arguments():
    """Each ``lib.nm_*(...)`` call in kernels/cpu.py has as many arguments as its C declaration (a starred
    argument counts as what it may hold: checked at run time instead), and a wrong count raises before C runs."""
    import ast
    import pathlib

    tree = ast.parse(pathlib.Path(cpu.__file__).read_text())
    calls = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr.startswith("nm_"):
            calls.append((node.func.attr, node.args))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Call)  # getattr(library(), f"nm_{name}")(...)
              and getattr(node.func.func, "id", None) == "getattr"):
            calls += [(name, node.args) for name in cpu.STOCHASTIC]
    assert {name for name, _ in calls} >= {"nm_mvue", "nm_greedy", "nm_sawb", "nm_absmax", "nm_int8_scale",
                                           *cpu.STOCHASTIC}
    for name, args in calls:
        if not any(isinstance(a, ast.Starred) for a in args):
            assert len(args) == len(cpu.SIGNATURES[name]), name
    if cpu.available():
        with pytest.raises(TypeError, match=r"nm_greedy takes 9 arguments \(10 given\)"):
            cpu.library().nm_greedy(*range(10))
        with pytest.raises(AttributeError, match="no entry point 'nm_nope'"):
            cpu.library().nm_nope

"""Property-based tests of the nm ops on hard inputs (hypothesis).

Random shapes, dtypes (fp32 / bf16 / fp16), N:M patterns with M up to 8, and values drawn from a
mix of ordinary numbers, zeros, denormals, huge values (1e30, fp16 max) and NaN/Inf. What must hold
for every input (docs/support.md, "Non-finite values"):

- MVUE / greedy: shape and dtype kept; the trailing remainder along ``dim`` is untouched; a group
  holding a NaN/Inf comes back unchanged (non-finite in -> non-finite out in that group); a finite
  group keeps at most N nonzeros, never creates a nonzero from a zero, keeps signs, and stays
  finite whenever the largest value MVUE can produce, (M-N+1)·max|x|, is representable;
  groups with fewer than N nonzeros come back unchanged.
- LUQ: any NaN/Inf makes the whole output non-finite; finite in -> finite out; with one sample
  every magnitude is 0 or α·2^k (α = max|x| / 2^(L-1), k = 0..L-1), never above max|x|.
- SAWB: non-finite in -> whole output non-finite; finite in -> finite out, at most 2^b levels,
  all integer multiples of one scale in [-2^(b-1), 2^(b-1)-1].
- The option parser and the functional API reject garbage with a ValueError naming the key.
"""
from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import nmcompile
from nmcompile import NMConfig
from nmcompile.kernels.grouping import split_groups, uniform_shape
from nmcompile.kernels.luq import luq_levels, luq_noise_shape
from nmcompile.passes.config import LUQ_BITS

SETTINGS = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow],
                    derandomize=True)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SPECIAL = [0.0, -0.0, 1e-40, -1e-45, 1e-30, 6e-8, 1e30, -1e30, 65504.0, -65504.0,
           float("nan"), float("inf"), float("-inf")]


@st.composite
def patterns(draw):
    m = draw(st.integers(2, 8))
    n = draw(st.integers(1, m - 1))
    return n, m


@st.composite
def tensors(draw, special: bool = True, max_rank: int = 3):
    """A tensor of a random dtype and shape; values mix ordinary numbers with special ones."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(1, 11), min_size=1, max_size=max_rank)))
    numel = math.prod(shape)
    ordinary = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
    element = st.one_of(ordinary, st.sampled_from(SPECIAL)) if special else ordinary
    # Mostly-ordinary tensors with a few specials, or dense fills of a single value (zeros, 1e30, ...)
    fill = draw(st.one_of(st.none(), st.sampled_from(SPECIAL))) if special else None
    if fill is not None and draw(st.booleans()):
        values = [fill] * numel
    else:
        values = draw(st.lists(element, min_size=numel, max_size=numel))
    return torch.tensor(values, dtype=torch.float64).reshape(shape).to(dtype)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as stored values, NaN equal to NaN."""
    return a.dtype == b.dtype and a.shape == b.shape and bool(
        ((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def check_pruned(x: torch.Tensor, y: torch.Tensor, n: int, m: int, dim: int, unbiased: bool) -> None:
    assert y.shape == x.shape and y.dtype == x.dtype
    xb, xt = split_groups(x, m, dim)
    yb, yt = split_groups(y, m, dim)
    assert same(yt, xt), "the remainder along dim must stay dense and untouched"
    finite = torch.isfinite(xb).all(-1)
    # non-finite groups pass through unchanged: NaN/Inf stay visible to GradScaler
    assert same(yb[~finite], xb[~finite])
    xf, yf = xb[finite].float(), yb[finite].float()
    assert ((yf != 0).sum(-1) <= n).all(), "more than N nonzeros in a group"
    assert (yf[xf == 0] == 0).all(), "a zero became nonzero"
    nz = yf != 0
    assert (torch.sign(yf[nz]) == torch.sign(xf[nz])).all(), "sign flipped"
    few = (xf != 0).sum(-1) < n
    assert same(yb[finite][few], xb[finite][few]), "groups with < N nonzeros must come back unchanged"
    # finite in -> finite out, whenever the largest possible output is representable
    top = float(xf.abs().amax()) if xf.numel() else 0.0
    growth = (m - n + 1) if unbiased else 1
    if growth * top * m < torch.finfo(x.dtype).max / 2:
        assert torch.isfinite(yf).all(), "finite group produced a non-finite value"
    if not unbiased:  # greedy keeps values unchanged, and the kept ones are the largest
        assert (yf[nz] == xf[nz]).all()
        a = xf.abs()
        kept_min = torch.where(nz, a, torch.inf).amin(-1)
        dropped_max = torch.where(nz, -torch.inf, a).amax(-1)
        full = nz.sum(-1) == n
        assert (kept_min[full] >= dropped_max[full]).all()
    else:  # a kept MVUE value is x/p: never below |x| in magnitude
        assert (yf[nz].abs() >= xf[nz].abs() * (1 - 1e-6)).all()


def test_mvue_top_uniform_keeps_every_capped_element():
    """u = 1 - 2^-24 (the largest torch.rand value): fp32 C - u rounds 2 - u to 1.0 and used to
    drop the second of two capped elements; a group with < N nonzeros must come back unchanged."""
    x = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]])
    u = torch.tensor([[1 - 2**-24]])
    assert torch.equal(torch.ops.nm.mvue(x, u, 3, 5, 1), x)
    g = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
    g[:, ::2] = 0  # two nonzeros per group of 4: both capped, both kept for every u
    for value in (0.0, 0.5, 1 - 2**-24):
        assert torch.equal(torch.ops.nm.mvue(g, torch.full((256, 2), value), 2, 4, 1), g)


@SETTINGS
@given(x=tensors(), pattern=patterns(), data=st.data())
def test_mvue_structure_and_propagation(x, pattern, data):
    n, m = pattern
    dim = data.draw(st.integers(-x.dim(), x.dim() - 1))
    u = torch.rand(uniform_shape(x.shape, m, dim), generator=torch.Generator().manual_seed(0))
    # include the extremes of [0, 1): u = 0 exactly and the largest float below 1
    u.view(-1)[: u.numel() // 2] = data.draw(st.sampled_from([0.0, 1 - 2**-24, 0.5]))
    y = torch.ops.nm.mvue(x, u, n, m, dim % x.dim())
    check_pruned(x, y, n, m, dim, unbiased=True)


@SETTINGS
@given(x=tensors(), pattern=patterns(), data=st.data())
def test_greedy_structure_and_propagation(x, pattern, data):
    n, m = pattern
    dim = data.draw(st.integers(-x.dim(), x.dim() - 1))
    y = nmcompile.greedy(x, f"{n}:{m}", dim)
    check_pruned(x, y, n, m, dim, unbiased=False)


@SETTINGS
@example(x=torch.tensor([0.0, 1e-44, -3e-45, 5e-45]), bits=4, levels="strict", samples=1, seed=0)  # α underflows
@example(x=torch.tensor([3e38, -1e38, 0.0]), bits=8, levels="reference", samples=2, seed=0)
@given(x=tensors(), bits=st.integers(2, 8), levels=st.sampled_from(["strict", "reference"]),
       samples=st.sampled_from([1, 1, 2]), seed=st.integers(0, 2**16))
def test_luq_levels_and_propagation(x, bits, levels, samples, seed):
    u = torch.rand(luq_noise_shape(x.shape, samples), generator=torch.Generator().manual_seed(seed))
    y = torch.ops.nm.luq(x, u, bits, levels)
    assert y.shape == x.shape and y.dtype == x.dtype
    if not torch.isfinite(x).all():
        assert not torch.isfinite(y).any(), "a NaN/Inf anywhere must make the whole LUQ output non-finite"
        return
    assert torch.isfinite(y).all(), "finite input produced a non-finite LUQ output"
    xf, yf = x.double(), y.double()
    amax = xf.abs().max()
    assert (yf.abs() <= amax).all(), "LUQ never exceeds max|x| (no level above it)"
    assert (yf[xf == 0] == 0).all()
    nz = yf != 0
    assert (torch.sign(yf[nz]) == torch.sign(xf[nz])).all()
    if samples == 1 and amax > 0:
        top = luq_levels(bits, levels) - 1
        steps = torch.tensor([0.0] + [2.0 ** (k - top) for k in range(top + 1)], dtype=torch.float32)
        allowed = (steps * amax.float()).to(x.dtype).double()  # α·2^k as fp32 math and x's dtype store it
        hit = (yf.abs().unsqueeze(-1) == allowed).any(-1)
        assert hit.all(), f"LUQ magnitudes outside {{0, α·2^k}}: {yf.abs()[~hit][:5].tolist()}"


@SETTINGS
@example(x=torch.tensor([0.0, 0.0, 65504.0], dtype=torch.float16))  # top level above fp16 max
@example(x=torch.tensor([1e30, -2e30, 0.0]))  # x² overflows fp32
@given(x=tensors())
def test_sawb_levels_and_propagation(x):
    y = nmcompile.sawb(x, 4)
    assert y.shape == x.shape and y.dtype == x.dtype
    if not torch.isfinite(x).all():
        assert not torch.isfinite(y).any(), "a NaN/Inf anywhere must make the whole SAWB output non-finite"
        return
    assert torch.isfinite(y).all(), "finite input produced a non-finite SAWB output"
    yf = y.double()
    assert torch.unique(yf).numel() <= 16, "more than 2^4 SAWB levels"
    yf = yf[yf.abs() < torch.finfo(x.dtype).max]  # a level beyond the dtype's range saturates there
    if (yf != 0).any():
        # every level is an integer multiple of one scale, within [-8, 7]
        smallest = yf[yf != 0].abs().min()
        step = [smallest / j for j in range(1, 9)]  # the smallest level is j·scale, some j ≤ 8
        ok = False
        for s in step:
            k = yf / s
            if (torch.isclose(k, k.round(), atol=2e-2, rtol=0).all() and k.round().min() >= -8
                    and k.round().max() <= 7):
                ok = True
        assert ok, "SAWB outputs are not integer multiples of one scale in [-8, 7]"


# -- options --------------------------------------------------------------------------------------
_VALID = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def _valid_pattern(s: str) -> bool:
    m = _VALID.match(s)
    return bool(m) and 0 < int(m.group(1)) < int(m.group(2))


@settings(deadline=None, max_examples=150, derandomize=True)
@given(s=st.one_of(st.text(max_size=12),
                   st.builds(lambda a, sep, b: f"{a}{sep}{b}", st.integers(-3, 12),
                             st.sampled_from([":", "-", "/", " : ", "::", ":-"]), st.integers(-3, 12))))
def test_sparsity_parser(s):
    if _valid_pattern(s):
        cfg = NMConfig(sparsity=s)
        n, m = cfg.pattern
        assert 0 < n < m
    else:
        with pytest.raises(ValueError, match="sparsity"):
            NMConfig(sparsity=s)
        with pytest.raises(ValueError, match="pattern"):
            nmcompile.mvue(torch.ones(8), pattern=s)


@settings(deadline=None, max_examples=80, derandomize=True)
@given(bits=st.one_of(st.integers(-2**40, 2**40), st.integers(-3, 12), st.floats(allow_nan=True),
                      st.booleans(), st.text(max_size=3)))
def test_bits_parser(bits):
    if isinstance(bits, int) and not isinstance(bits, bool) and bits in LUQ_BITS:
        assert NMConfig(quant="luq", bits=bits).bits == bits
        assert nmcompile.luq(torch.ones(4), bits=bits).shape == (4,)
    else:
        with pytest.raises(ValueError, match="bits"):
            NMConfig(quant="luq", bits=bits)
        with pytest.raises(ValueError, match="bits"):
            nmcompile.luq(torch.ones(4), bits=bits)
        with pytest.raises(ValueError, match="fwd_bits"):
            NMConfig(fwd_quant="sawb", fwd_bits=bits)


@pytest.mark.parametrize("options, key", [
    ({"sparsity": "3:2"}, "sparsity"), ({"sparsity": "2-4"}, "sparsity"), ({"method": "topk"}, "method"),
    ({"gemms": ["fwd"]}, "gemms"), ({"gemms": []}, "gemms"), ({"quant": "fp4"}, "quant"),
    ({"smp": 0}, "smp"), ({"levels": "loose"}, "levels"), ({"include": "("}, "include"),
    ({"keep_first_last": "yes"}, "keep_first_last"), ({"inner": "eager"}, "inner"),
    ({"sparsty": "2:4"}, "sparsty"),
])
def test_bad_options_name_the_key(options, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        NMConfig.from_options(options)

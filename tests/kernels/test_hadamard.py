"""The random Hadamard rotation around a gradient quantizer (kernels/hadamard.py, option ``hadamard``).

- the blocks are Sylvester-Hadamard matrices scaled to be orthogonal, block-diagonal along K, and the
  rotation is undone along any dim;
- q(x R) Rᵀ is unbiased for x at every fixed draw of the signs, and its per-element variance is the exact
  (1/b) Σ over the block of q's variance at the rotated input; rotating back with other signs (a mutation)
  fails both checks on the same draws;
- through the pass: the records say which GEMMs are rotated and why each stays dense, a K the blocks do
  not tile is left unrotated with a note, bad options name what is allowed, and the compiled weight
  gradient averages to the exact one.
"""
from __future__ import annotations

import pytest
import torch

import nmcompile
from nmcompile import NMConfig
from nmcompile.kernels.hadamard import BLOCKS, hadamard_blocks, rotate, rotated, signs, unrotate
from nmcompile.kernels.random import draw_seed
from nmcompile.kernels.reference import luq_variance
from tests.conftest import heavy_tailed
from tests.kernels.stats import max_z, variance_z

AOT = {"inner": "aot_eager"}


def sylvester(b: int) -> torch.Tensor:
    """H[i, j] = (-1)^popcount(i & j) / √b, from its definition."""
    i = torch.arange(b)
    parity = torch.tensor([[bin(int(a) & int(c)).count("1") % 2 for c in i] for a in i])
    return (1.0 - 2.0 * parity.double()) / b**0.5


@pytest.mark.parametrize("block", BLOCKS)
def test_blocks_are_orthogonal_sylvester_hadamard_along_the_last_dim(block):
    k = 3 * block
    x = torch.randn(5, k, dtype=torch.float64, generator=torch.Generator().manual_seed(block))
    expected = x @ torch.block_diag(*[sylvester(block)] * 3)
    assert torch.allclose(hadamard_blocks(x, block), expected, rtol=0, atol=1e-12 * block)
    h = hadamard_blocks(torch.eye(block, dtype=torch.float64), block)
    assert torch.allclose(h @ h, torch.eye(block, dtype=torch.float64), atol=1e-12 * block)  # symmetric, H H = I


@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_rotation_along_any_dim_is_undone_and_keeps_the_norm(dim):
    x = torch.randn(16, 32, 64, generator=torch.Generator().manual_seed(3))
    d = signs(torch.tensor(99), x.shape[dim], x.device)
    y = rotate(x, d, dim, 16)
    assert y.dtype == torch.float32 and not torch.allclose(y, x)
    assert torch.allclose(unrotate(y, d, dim, 16), x, atol=1e-5)
    torch.testing.assert_close(y.norm(), x.norm(), rtol=1e-5, atol=0)
    moved = y.movedim(dim, -1)  # the blocks along dim only: a slice across dim mixes nothing from another slice
    assert torch.allclose(moved[..., :16], hadamard_blocks(x.movedim(dim, -1)[..., :16] * d[:16], 16))


def test_signs_are_balanced_and_reproducible():
    a, b = signs(torch.tensor(5), 4096, "cpu"), signs(torch.tensor(5), 4096, "cpu")
    assert torch.equal(a, b) and set(a.unique().tolist()) == {-1.0, 1.0}
    assert abs(a.sum().item()) < 5 * 4096**0.5  # a fair coin: the sum within five standard deviations
    assert not torch.equal(a, signs(torch.tensor(6), 4096, "cpu"))


def _draws(x: torch.Tensor, n: int, block: int, seed: int, undo_seed: int | None = None) -> tuple:
    """n draws of luq4(x R) Rᵀ at one fixed R (rows of x: independent; its last dim rotated), and the exact
    per-element variance (1/b) Σ_block var_luq(x R). ``undo_seed``: rotate back with other signs."""
    d = signs(torch.tensor(seed), x.shape[-1], x.device)
    y = rotate(x, d, -1, block)
    seeds = torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(seed + 1))
    q = torch.ops.nm.luq(y.expand(n, *y.shape).contiguous(), seeds, 4, "strict")  # one α: copies share max|y|
    back = d if undo_seed is None else signs(torch.tensor(undo_seed), x.shape[-1], x.device)
    per = luq_variance(y, 4, "strict")
    blocks = per.reshape(*per.shape[:-1], -1, block).mean(-1, keepdim=True)  # (1/b)·Σ over the block
    return unrotate(q, back, -1, block), blocks.expand(*per.shape[:-1], -1, block).reshape(per.shape)


@pytest.mark.parametrize("block", [16, 64])
def test_rotated_luq_is_unbiased_with_the_exact_variance(block):
    x = heavy_tailed(8, 128, seed=block)  # log-normal magnitudes: outliers in every block
    n = 4000
    out, variance = _draws(x, n, block, seed=block)
    assert max_z(out, x, variance) < 5
    assert variance_z(out, variance.sum(-1)) < 5
    # the total variance is q's own at the rotated input (Rᵀ is orthogonal)
    torch.testing.assert_close(variance.sum(), luq_variance(rotate(x, signs(torch.tensor(block), 128, "cpu"), -1,
                                                                   block), 4, "strict").sum(), rtol=1e-12, atol=0)


def test_rotating_back_with_other_signs_is_rejected():
    x = heavy_tailed(8, 128, seed=16)
    out, variance = _draws(x, 4000, 16, seed=16, undo_seed=17)
    assert max_z(out, x, variance) > 5


def test_rotated_keeps_the_dtype_and_draws_its_signs_from_torch():
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    torch.manual_seed(0)
    a = rotated(lambda y: y, x, 1, 32)
    torch.manual_seed(0)
    b = rotated(lambda y: y, x, 1, 32)
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    # the identity quantizer: rotated there and back in fp32, then rounded once to bf16
    torch.manual_seed(0)
    d = signs(draw_seed(x.device), 64, x.device)
    y = unrotate(rotate(x, d, 1, 32), d, 1, 32)
    assert torch.equal(a, y.to(torch.bfloat16))
    # fp32 round trip: 2·log2(32) butterfly stages and two scalings, each rounding within 2^-24 of values no
    # larger than the block's 1-norm (<= the row's); the orthogonal second rotation can gather a block's errors
    # into one element (at most √32 times the largest). Then one bf16 rounding: half an ulp, 2^-9 relative.
    fp32 = 12 * 32**0.5 * 2.0**-24 * x.float().abs().sum(-1, keepdim=True)
    assert ((y - x.float()).abs() <= fp32).all()
    assert ((a.float() - x.float()).abs() <= 2.0**-9 * x.float().abs() + 2 * fp32).all()


# ---- through the pass ------------------------------------------------------------------------------------
class Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(64, 48), torch.nn.Linear(48, 32)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_records_say_what_is_rotated_and_why_it_stays_dense():
    r = nmcompile.explain(Two(), torch.randn(64, 64), quant="luq", scales="row", hadamard=16, **AOT)
    assert sorted((g.module, g.role) for g in r.backward) == [("a", "wgrad"), ("b", "dgrad"), ("b", "wgrad")]
    for g in r.backward:  # b's dgrad reduces over b's 32 outputs, the wgrads over the 64 tokens
        assert g.transforms == ["luq4/row hadamard16"] and not g.notes
        assert str(g.kernel) == "dense" and "Hadamard-rotated basis" in g.kernel_note


def test_a_k_the_blocks_do_not_tile_is_left_unrotated_with_a_note():
    x = torch.randn(64, 64, requires_grad=True)  # now dgrad of a is computed: it reduces over a's 48 outputs
    r = nmcompile.explain(Two(), x, quant="luq", hadamard=32, **AOT)
    g = next(g for g in r.backward if (g.module, g.role) == ("a", "dgrad"))
    assert g.transforms == ["luq4"] and g.notes == ["hadamard 32 skipped: K=48 is not a multiple of the block size"]


@pytest.mark.parametrize("options,message", [
    ({"quant": "luq", "hadamard": 12}, "hadamard=12 is not allowed; use an integer in 0, 2, 4"),
    ({"quant": "luq", "hadamard": True}, "hadamard=True is not allowed"),
    ({"hadamard": 16}, "quant is not set"),
    ({"quant": "luq", "sparsity": "2:4", "hadamard": 16}, "undoing its N:M structure"),
    ({"quant": "sr", "bits": 8, "fwd_quant": "absmax", "fwd_bits": 8, "dense_if_faster": True, "hadamard": 16},
     "set dense_if_faster=False"),
])
def test_bad_options_name_what_is_allowed(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        NMConfig(**options)


def test_the_compiled_weight_gradient_averages_to_the_exact_one():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32)
    x, target = torch.randn(128, 64), torch.randn(128, 32)

    def grad(model):
        layer.weight.grad = None
        torch.nn.functional.mse_loss(model(x), target).backward()
        return layer.weight.grad.clone()

    exact = grad(layer)
    compiled = torch.compile(layer, backend="nm", options={"quant": "luq", "hadamard": 16, **AOT})
    draws = torch.stack([grad(compiled) for _ in range(400)])
    assert not torch.allclose(draws[0], exact)  # compressed
    # z of the mean against the exact gradient, each element's standard error from the draws themselves
    z = (draws.double().mean(0) - exact.double()).abs() / (draws.double().std(0) / 400**0.5)
    assert z.max() < 5.5  # 2048 elements: a normal's max |z| exceeds 5.5 with probability below 1e-4

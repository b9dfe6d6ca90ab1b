import pytest
import torch

import nmcompile
from nmcompile.kernels import reference as ref
from nmcompile.kernels.sawb import SAWB_COEFFICIENTS


def test_sixteen_integer_levels_of_one_scale():
    x = torch.randn(64, 64)
    y = nmcompile.sawb(x)
    c1, c2 = SAWB_COEFFICIENTS[4]
    scale = (c1 * x.pow(2).mean().sqrt() - c2 * x.abs().mean()) / 8
    q = y / scale
    torch.testing.assert_close(q, q.round(), atol=1e-4, rtol=0)
    assert q.round().min() >= -8 and q.round().max() <= 7
    assert len(torch.unique(q.round())) <= 16
    torch.testing.assert_close(y, ref.sawb_reference(x, 4, c1, c2))


def test_non_negative_tensors_use_all_sixteen_levels_unsigned():
    x = torch.relu(torch.randn(4096))
    y = nmcompile.sawb(x)
    c1, c2 = SAWB_COEFFICIENTS[4]
    scale = (c1 * x.pow(2).mean().sqrt() - c2 * x.abs().mean()) / 15
    q = y / scale
    torch.testing.assert_close(q, q.round(), atol=1e-4, rtol=0)
    assert q.round().min() == 0 and q.round().max() == 15  # the whole unsigned grid is reachable
    torch.testing.assert_close(y, ref.sawb_reference(x, 4, c1, c2))


def test_round_to_nearest_and_straight_through():
    x = torch.randn(128, requires_grad=True)
    y = nmcompile.sawb(x)
    y.backward(torch.arange(128.0))
    assert torch.equal(x.grad, torch.arange(128.0))
    scale = (y[y != 0].abs().min())
    inside = x.detach().abs() < 7 * scale
    assert ((y.detach() - x.detach()).abs()[inside] <= scale / 2 + 1e-6).all()


def test_degenerate_tensors():
    assert torch.equal(nmcompile.sawb(torch.zeros(5)), torch.zeros(5))
    c = torch.full((10,), 3.0)  # SAWB clip <= 0: falls back to max|x|
    assert torch.isfinite(nmcompile.sawb(c)).all() and (nmcompile.sawb(c) > 0).all()
    x = torch.randn(10)
    x[3] = float("nan")
    assert nmcompile.sawb(x).isnan().any()


def test_bad_bits():
    with pytest.raises(ValueError, match="bits=3"):
        nmcompile.sawb(torch.randn(3), bits=3)

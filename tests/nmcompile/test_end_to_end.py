"""End-to-end gradient noise per parameter, against a chain whose compounding factor is known exactly."""
import math

import pytest
import torch
import torch.nn as nn

from nmcompile.end_to_end import end_to_end_noise, exact_options

DEPTH, DRAWS = 5, 256


class HadamardChain(nn.Module):
    """Layers y = H x + b with H = [[1, 1], [1, −1]]/√2, one token, loss = sum of the outputs.

    With MVUE 1:2 on every dgrad: a gradient (a, ±a) keeps one entry at random, doubled, and Hᵀ spreads it back
    to two entries of equal magnitude: every compression doubles ‖ĝ‖² while keeping E[ĝ] = g, and H keeps norms.
    So the gradient arriving at the layer k below the top, the bias gradient there, has
    E‖ĝ − g‖² = (2^k − 1)·‖g‖² exactly: the noise compounds by a factor 2 per pruned dgrad."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(DEPTH))
        with torch.no_grad():
            for layer in self.layers:
                layer.weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]) / math.sqrt(2))
                layer.bias.zero_()

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x.sum()


def test_noise_compounds_by_the_known_factor_through_pruned_dgrads():
    torch.manual_seed(0)
    report = end_to_end_noise(HadamardChain(), torch.randn(1, 2), options={"sparsity": "1:2", "gemms": ["dgrad"]},
                              draws=DRAWS)
    for k in range(DEPTH):
        p = report.find(f"layers.{DEPTH - 1 - k}.bias")
        assert p.signal == pytest.approx(2.0)
        # per draw ‖ĝ−g‖² = ‖ĝ‖² − 2⟨ĝ,g⟩ + ‖g‖² with ‖ĝ‖² = 2^(k+1) fixed: its std is at most 2‖ĝ‖‖g‖
        bound = 5 * 2 * math.sqrt(2 ** (k + 1) * 2) / math.sqrt(DRAWS) / p.signal
        assert abs(p.noise_to_signal - (2 ** k - 1)) <= bound, (k, p.noise_to_signal)
        assert abs(p.bias) <= 5 * math.sqrt(2 * p.variance * p.signal / DRAWS) + 1e-9  # unbiased: ḡ − g ~ 0
    assert report.find(f"layers.{DEPTH - 1}.weight").noise == pytest.approx(0.0, abs=1e-9)  # nothing above it


def test_a_deterministic_compression_has_no_variance_and_says_its_bias():
    torch.manual_seed(0)
    report = end_to_end_noise(HadamardChain(), torch.randn(1, 2), draws=2,
                              options={"sparsity": "1:2", "method": "greedy", "gemms": ["dgrad"]})
    p = report.find("layers.0.bias")
    assert p.variance == pytest.approx(0.0, abs=1e-9) and p.bias == pytest.approx(p.noise) and p.noise > 0


def test_exact_options_keep_the_forward_and_drop_gradient_compression():
    assert exact_options({"sparsity": "2:4", "quant": "luq", "smp": 2, "fwd_quant": "sawb", "fwd_bits": 4,
                          "keep_first_last": False}) == {"fwd_quant": "sawb", "fwd_bits": 4, "keep_first_last": False}


def test_training_state_is_untouched():
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(32, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    end_to_end_noise(model, x, options={"quant": "luq"}, draws=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state()) and all(p.grad is None for p in model.parameters())


def test_bad_draws_are_named():
    with pytest.raises(ValueError, match="draws=1"):
        end_to_end_noise(HadamardChain(), torch.randn(1, 2), options={"quant": "luq"}, draws=1)

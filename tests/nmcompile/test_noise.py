"""The gradient-noise monitor: its estimators against the closed forms, and that it leaves training alone.

Statistical checks average R independent measurements; each is compared with its closed form within
4 standard errors estimated from the same R values (a CLT bound: a correct estimator fails about once in
16 000 runs; a biased one by more than that fails)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from nmcompile import NoiseMonitor, noise_report
from nmcompile.kernels.reference import greedy_reference, luq_variance, mvue_variance
from nmcompile.passes.config import NMConfig

K, O, D = 16, 8, 12  # tokens summed over by the update GEMM, output features, input features
R = 400


class Probe(nn.Module):
    """loss = Σ (X·Wᵀ) ∘ C, so dL/dY = C exactly and the update GEMM is dW = Cᵀ·X."""

    def __init__(self, d_in: int = D):
        super().__init__()
        self.lin = nn.Linear(d_in, O, bias=False)

    def forward(self, x, c):
        return (self.lin(x) * c).sum()


def _repeat(monitor, make_inputs, count=R):
    out = []
    for i in range(count):
        torch.manual_seed(1000 + i)  # the step's own draw: a new one per measurement, as in training
        report = monitor.measure(*make_inputs(i))
        (g,) = report.gemms
        out.append(g)
    return out


def _within(values, expected, sigmas=4.0):
    t = torch.tensor(values, dtype=torch.float64)
    se = t.std() / math.sqrt(len(values))
    assert abs(t.mean().item() - expected) <= sigmas * se.item(), (t.mean().item(), expected, se.item())


def test_mvue_variance_matches_the_closed_form():
    torch.manual_seed(0)
    c = torch.randn(K, O) * torch.rand(K, O).pow(3)  # uneven magnitudes: p < 1 and p = 1 both occur
    x = torch.eye(K)  # X = I: dW = Cᵀ, so the GEMM's variance is the compressed operand's
    monitor = NoiseMonitor(Probe(K), {"sparsity": "2:4"})
    rows = _repeat(monitor, lambda i: (x, c))
    groups = c.t().reshape(O, K // 4, 4)  # the update GEMM groups 4 consecutive tokens of one feature
    exact = mvue_variance(groups, 2).sum().item()
    assert exact > 0
    assert all(g.role == "wgrad" and g.transforms == ["mvue 2:4 along K (tokens)"] for g in rows)
    assert rows[0].signal == pytest.approx(c.double().pow(2).sum().item(), rel=1e-6)
    _within([g.compression_variance for g in rows], exact)
    _within([g.compression_noise for g in rows], exact)  # unbiased: E‖Ĝ − G‖² is the variance
    _within([g.compression_bias for g in rows], 0.0)


def test_luq_variance_matches_the_closed_form_through_a_dense_operand():
    # LUQ's draws are independent per element, so E‖(Â − A)·X‖² = Σ_ok Var(Â_ok)·‖X_k,:‖² for any X.
    torch.manual_seed(1)
    c, x = torch.randn(K, O), torch.randn(K, D)
    for smp in (1, 2):
        monitor = NoiseMonitor(Probe(), {"quant": "luq", "smp": smp}, draws=3)
        rows = _repeat(monitor, lambda i: (x, c), count=200)
        levels = NMConfig.from_options({"quant": "luq"})[0].levels
        var = luq_variance(c.t(), 4, levels, samples=smp)  # [O, K]
        exact = (var * x.double().pow(2).sum(1)).sum().item()
        _within([g.compression_variance for g in rows], exact)
        _within([g.compression_noise for g in rows], exact)


def test_greedy_error_is_all_bias():
    torch.manual_seed(2)
    c, x = torch.randn(K, O), torch.eye(K)
    report = noise_report(Probe(K), x, c, sparsity="2:4", method="greedy", draws=3)
    (g,) = report.gemms
    pruned = greedy_reference(c.t(), 2, 4, 1)
    bias = (pruned.double() - c.t().double()).pow(2).sum().item()
    assert g.compression_variance == 0.0  # deterministic: every draw is the same
    assert g.compression_noise == pytest.approx(bias, rel=1e-6)  # so all of E‖Ĝ − G‖² is bias
    assert g.compression_bias == pytest.approx(bias, rel=1e-6)
    assert g.noise_to_signal == pytest.approx(bias / g.signal)


def test_minibatch_noise_is_the_difference_of_the_halves():
    torch.manual_seed(3)
    c, x = torch.randn(K, O), torch.randn(K, D)
    (g,) = noise_report(Probe(), x, c, sparsity="2:4").gemms
    h = K // 2
    first, second = c[:h].t().double() @ x[:h].double(), c[h:].t().double() @ x[h:].double()
    # G itself is the float32 GEMM output: agreement to float32 rounding
    assert g.minibatch_noise == pytest.approx((first - second).pow(2).sum().item(), rel=1e-5)
    assert g.noise_to_minibatch == pytest.approx(g.compression_noise / g.minibatch_noise)


def test_minibatch_noise_is_unbiased_for_independent_rows():
    # Rows c_k x_kᵀ independent with mean 0 and E‖c_k x_kᵀ‖² = O·D: Var(Σ_k c_k x_kᵀ) = K·O·D. An odd K
    # exercises the unequal halves (a = 6, b = 7).
    k = 13
    gen = torch.Generator().manual_seed(4)
    monitor = NoiseMonitor(Probe(), {"quant": "luq"})
    rows = _repeat(monitor, lambda i: (torch.randn(k, D, generator=gen), torch.randn(k, O, generator=gen)))
    _within([g.minibatch_noise for g in rows], k * O * D)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(D, 16), nn.BatchNorm1d(16), nn.Linear(16, 4)

    def forward(self, x, y):
        return nn.functional.cross_entropy(self.fc2(torch.relu(self.bn(self.fc1(x)))), y)


def _train(monitor_every, tmp_path=None, writer=None):
    torch.manual_seed(5)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    options = {"sparsity": "2:4", "quant": "luq", "inner": "aot_eager"}
    compiled = torch.compile(model, backend="nm", options=options)
    monitor = None
    if monitor_every:
        monitor = NoiseMonitor(model, options, every=monitor_every, path=tmp_path / "noise.jsonl", writer=writer)
    data = torch.Generator().manual_seed(6)
    for step in range(4):
        x, y = torch.randn(16, D, generator=data), torch.randint(0, 4, (16,), generator=data)
        if monitor is not None:
            monitor.on_step(step, x, y)
        compiled(x, y).backward()
        opt.step()
        opt.zero_grad()
    return model, torch.rand(3)


def test_monitoring_changes_neither_the_gradients_nor_the_rng_stream(tmp_path):
    class Writer:
        def __init__(self):
            self.scalars = []

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

    torch._dynamo.reset()
    plain, plain_rng = _train(0)
    writer = Writer()
    monitored, monitored_rng = _train(2, tmp_path, writer)
    for (name, a), b in zip(plain.state_dict().items(), monitored.state_dict().values()):
        assert torch.equal(a, b), name  # weights and BatchNorm statistics
    assert torch.equal(plain_rng, monitored_rng)
    lines = [json.loads(line) for line in (tmp_path / "noise.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 2]
    assert lines[0]["schema"] == "nmcompile.noise/1"
    assert {g["module"] for g in lines[0]["gemms"]} == {"fc1", "fc2"}
    assert {step for _, _, step in writer.scalars} == {0, 2}
    assert ("nm_noise/total/noise_to_signal" in {tag for tag, _, _ in writer.scalars})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"every": 0}, "every=0"),
        ({"draws": 1}, "draws=1"),
        ({"writer": object()}, "add_scalar"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        NoiseMonitor(Probe(), {"sparsity": "2:4"}, **kwargs)


def test_bad_option_and_nothing_to_measure():
    with pytest.raises(ValueError, match="sparsity"):
        noise_report(Probe(), torch.randn(K, D), torch.randn(K, O), sparsity="3:2")
    with pytest.raises(ValueError, match="no backward GEMM with a compressed gradient"):
        noise_report(Probe(), torch.randn(K, D), torch.randn(K, O), fwd_quant="sawb")


def test_the_stall_ratio_over_a_window_sums_its_measurements():
    from nmcompile.noise import STALL_FACTOR, stall_ratio, windowed_stall_ratio

    points = [(6.0, 1.0), (3.0, 0.0), (0.0, 2.0)]
    assert stall_ratio(6.0, 1.0) == 6.0 / STALL_FACTOR == 2.0 and stall_ratio(1.0, 0.0) is None
    assert windowed_stall_ratio(points[:1], 4) == 2.0
    assert windowed_stall_ratio(points, 1) == 0.0  # the last alone: no gradient left above its minibatch noise
    assert windowed_stall_ratio(points, 2) == 3.0 / (STALL_FACTOR * 2.0)
    assert windowed_stall_ratio(points, 3) == windowed_stall_ratio(points, 99) == 9.0 / (STALL_FACTOR * 3.0)
    assert windowed_stall_ratio(points[1:2], 1) is None  # no compression noise: no ratio
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match=f"window={bad!r} must be a positive integer"):
            windowed_stall_ratio(points, bad)

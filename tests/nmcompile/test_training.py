"""Training on real bundled data (scikit-learn's digits): MVUE and LUQ stay within seed noise of
dense training; greedy N:M gradients are measurably worse (the MVUE paper's claim, small scale)."""
import statistics

import pytest
import torch
import torch.nn as nn
from sklearn.datasets import load_digits

SEEDS = (0, 1, 2)
BOTH = ["wgrad", "dgrad"]  # prune both backward GEMMs: greedy's bias compounds through depth


def data():
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x, y, perm[:1400], perm[1400:]


def train(options, seed, epochs=8):
    x, y, train_idx, test_idx = data()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    # inner="aot_eager": the same rewritten graphs without code generation, to keep CI fast
    f = torch.compile(model, backend="nm", options={**options, "inner": "aot_eager"}) if options else model
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(epochs):
        order = train_idx[torch.randperm(len(train_idx))]
        for i in range(0, len(order) - 63, 64):
            batch = order[i:i + 64]
            loss = nn.functional.cross_entropy(f(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    with torch.no_grad():
        acc = (model(x[test_idx]).argmax(1) == y[test_idx]).float().mean().item()
    return acc, statistics.mean(losses[-20:]), len(test_idx)


@pytest.fixture(scope="module")
def dense():
    runs = [train({}, s) for s in SEEDS]
    accs = [r[0] for r in runs]
    n_test = runs[0][2]
    mean = statistics.mean(accs)
    # margin: 3 standard deviations of the larger of seed-to-seed spread and the test set's
    # binomial sampling error of an accuracy near `mean`
    margin = 3 * max(statistics.stdev(accs), (mean * (1 - mean) / n_test) ** 0.5)
    return mean, margin, statistics.mean(r[1] for r in runs)


@pytest.mark.parametrize("options", [
    {"sparsity": "2:4", "gemms": BOTH},
    {"sparsity": "1:2", "gemms": BOTH},
    {"quant": "luq", "fwd_quant": "sawb"},
], ids=["mvue2:4", "mvue1:2", "luq4+sawb4"])
def test_unbiased_methods_match_dense(dense, options):
    mean, margin, _ = dense
    acc = statistics.mean(train(options, s)[0] for s in SEEDS)
    assert abs(acc - mean) <= margin, f"accuracy {acc:.3f} vs dense {mean:.3f} ± {margin:.3f}"


def test_greedy_is_measurably_worse(dense):
    mean, margin, dense_loss = dense
    runs = [train({"sparsity": "2:4", "method": "greedy", "gemms": BOTH}, s) for s in SEEDS]
    acc = statistics.mean(r[0] for r in runs)
    loss = statistics.mean(r[1] for r in runs)
    assert acc < mean - margin, f"greedy accuracy {acc:.3f} vs dense {mean:.3f} ± {margin:.3f}"
    assert loss > 2 * dense_loss

"""Helpers shared by the SINGD tests: small models, training loops, comparisons."""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

STRUCTURE_NAMES = [
    "dense", "diagonal", "block30diagonal", "hierarchical15_15", "triltoeplitz", "triutoeplitz",
]


def mlp(seed=0, widths=(20, 36, 33, 5), last_bias=False, inplace=True) -> nn.Sequential:
    """Widths above 30 exercise every part of block30diagonal and hierarchical15_15."""
    torch.manual_seed(seed)
    layers: List[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        last = i == len(widths) - 2
        layers.append(nn.Linear(d_in, d_out, bias=last_bias or not last))
        if not last:
            layers.append(nn.ReLU(inplace=inplace) if i % 2 == 0 else nn.Tanh())
    return nn.Sequential(*layers)


def cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding="same", groups=2, bias=False),
        nn.ReLU(),
        nn.Conv2d(8, 4, 2, dilation=2),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 5),
    )


def classification_batch(seed: int = 1, n: int = 16, shape=(20,), classes: int = 5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def train(model, opt, batches, loss_fn=None, forward=None, scheduler=None) -> List[float]:
    """One optimizer step per (x, y) batch; returns the losses."""
    loss_fn = loss_fn or nn.functional.cross_entropy
    forward = forward or model
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = loss_fn(forward(x), y)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def optimizer_state_dense(opt) -> Dict[str, torch.Tensor]:
    """K, C, m_K, m_C of either implementation, as dense matrices by layer name."""
    out = {}
    for key in ("Ks", "Cs", "m_Ks", "m_Cs"):
        for name, mat in getattr(opt, key).items():
            out[f"{key}.{name}"] = mat.to_dense()
    return out


def assert_same_training(model, opt, ref_model, ref_opt, rtol: float = 1e-5):
    """Parameters and K, C, m_K, m_C agree to relative error ``rtol`` (Frobenius)."""
    for (name, p), p_ref in zip(model.named_parameters(), ref_model.parameters()):
        assert rel_err(p, p_ref) < rtol, f"parameter {name}: rel. error {rel_err(p, p_ref):.2e}"
    mine, ref = optimizer_state_dense(opt), optimizer_state_dense(ref_opt)
    assert mine.keys() == ref.keys()
    for key in ref:
        err = rel_err(mine[key], ref[key])
        assert err < rtol, f"{key}: rel. error {err:.2e}"
    # the preconditioner must actually have moved away from its initial value
    moved = [k for k in ref if k.startswith("Ks.") and rel_err(ref[k], torch.eye(ref[k].shape[0])) > 1e-4]
    assert moved, "test is vacuous: K never changed"

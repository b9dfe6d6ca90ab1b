"""Data that ships with the install, so the demo and the reproduction need no download.

``load_digits_split``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes; the
file is inside the scikit-learn wheel), split once with a fixed seed and standardised with the
training split's statistics.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Split(NamedTuple):
    x_train: torch.Tensor  # [n_train, 64] float32, standardised
    y_train: torch.Tensor  # [n_train] int64
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(test_fraction: float = 0.2, split_seed: int = 0) -> Split:
    """The digits data set as tensors; the split depends only on ``split_seed`` (not on the run's
    seed), so runs with different seeds see the same train/test sets."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r} must lie strictly between 0 and 1")
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - scikit-learn is a declared dependency of the demo
        raise ImportError(
            "the nmcompile demo needs scikit-learn (pip install scikit-learn) for its bundled digits data"
        ) from err
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    n_test = int(round(len(x) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    mean = x[train].mean(0)
    std = x[train].std(0).clamp_min(1e-3)  # some border pixels are constant
    x = (x - mean) / std
    return Split(x[train], y[train], x[test], y[test])


def batches(n: int, batch_size: int, generator: torch.Generator):
    """Shuffled index batches of exactly ``batch_size`` (the last partial batch is dropped, so every
    step has the same shape: one compiled graph, and the token dimension stays a multiple of M)."""
    perm = torch.randperm(n, generator=generator)
    for start in range(0, n - batch_size + 1, batch_size):
        yield perm[start : start + batch_size]

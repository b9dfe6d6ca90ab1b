"""The demo's curves: training loss and test accuracy per epoch of every recipe (``curves.png``)."""
from __future__ import annotations

import torch


def plot_curves(runs: dict, path: str, title: str) -> None:
    """Training loss and test accuracy per epoch of every method (mean over seeds, ± std shaded) in one PNG."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, run in runs.items():
        for ax, key, scale in ((ax_loss, "epoch_loss", 1.0), (ax_acc, "epoch_test_acc", 100.0)):
            curves = torch.tensor([[scale * v for v in r["curves"][key]] for r in run["seeds"]], dtype=torch.float64)
            epochs = list(range(1, curves.shape[1] + 1))
            mean = curves.mean(0)
            (line,) = ax.plot(epochs, mean, marker=".", label=name, ls="--" if "wgrad+dgrad" in name else "-")
            if curves.shape[0] > 1:
                std = curves.std(0)
                ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.12)
    ax_loss.set(xlabel="epoch", ylabel="mean training loss", yscale="log", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    ax_acc.legend(fontsize=8)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""The LM tools' figures: matplotlib without a display, and one way to write a figure."""
from __future__ import annotations

import pathlib


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only: the tools also run where there is no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: pathlib.Path, dpi: int) -> None:
    """Lay ``fig`` out, write it to ``path`` and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)

"""The training text: the ``.py`` files of the running Python's standard library, read at run time (nothing to
download), split into training and validation by file."""
from __future__ import annotations

import hashlib
import pathlib
import sysconfig

import torch

_SKIP = {"site-packages", "test", "tests", "idle_test"}  # installed packages and the test suites


def stdlib_corpus(val_every: int = 10) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(train bytes, validation bytes, description) as int64 tokens: every stdlib ``.py`` outside test packages and
    site-packages, in sorted order; a file is validation when a stable hash of its path is 0 mod ``val_every``."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not _SKIP & set(p.relative_to(root).parts))
    train, val, digest = [], [], hashlib.sha256()
    for path in files:
        rel = path.relative_to(root).as_posix()
        data = path.read_bytes()
        digest.update(rel.encode() + b"\0" + data)
        (val if int(hashlib.sha256(rel.encode()).hexdigest(), 16) % val_every == 0 else train).append(data)
    t, v = (torch.frombuffer(bytearray(b"\n\n".join(part)), dtype=torch.uint8) for part in (train, val))
    meta = {"root": str(root), "files": len(files), "validation_files": len(val), "sha256": digest.hexdigest(),
            "train_bytes": len(t), "validation_bytes": len(v)}
    return t.long(), v.long(), meta


def chunks(data: torch.Tensor, starts: torch.Tensor, block: int) -> torch.Tensor:
    """The ``block + 1`` tokens from each start (a 1-D ``starts``), one row each."""
    return data[starts.unsqueeze(1) + torch.arange(block + 1)]


def windows(data: torch.Tensor, starts: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``block`` bytes at each start, and the bytes after each (the targets)."""
    chunk = chunks(data, starts, block)
    return chunk[:, :-1], chunk[:, 1:]


def random_batch(train: torch.Tensor, gen: torch.Generator, batch: int, block: int) -> tuple:
    """``batch`` windows of ``block`` bytes (and their next bytes) at starts drawn from ``gen``."""
    return windows(train, torch.randint(0, len(train) - block - 1, (batch,), generator=gen), block)


def validation(val: torch.Tensor, batches: int, batch: int, block: int, seed: int = 1234) -> list:
    """``batches`` fixed validation batches (the same for every run of a seed-independent evaluation)."""
    starts = torch.randint(0, len(val) - block - 1, (batches * batch,), generator=torch.Generator().manual_seed(seed))
    return [windows(val, s, block) for s in starts.split(batch)]


def fixed_batches(text: torch.Tensor, steps: int, batch: int, block: int, seed: int = 0) -> list:
    """``steps`` batches of ``block + 1`` tokens drawn once (the step benchmarks give every configuration these)."""
    starts = torch.randint(0, len(text) - block - 1, (steps, batch), generator=torch.Generator().manual_seed(seed))
    return [chunks(text, s, block) for s in starts]


def lm_data(batch: int, block: int, eval_batches: int) -> tuple[dict, dict]:
    """(data, corpus description): ``data["train"]`` the training bytes, ``data["val"]`` ``eval_batches`` fixed
    validation batches for the final score and ``data["val_small"]`` the first quarter of them for the curve."""
    train, val, corpus = stdlib_corpus()
    batches = validation(val, eval_batches, batch, block)
    return {"train": train, "val": batches, "val_small": batches[: max(1, eval_batches // 4)]}, corpus

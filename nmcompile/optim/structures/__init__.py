"""Preconditioner structures for SINGD, by their official ``singd`` names."""

from typing import Dict, Type

from .base import StructuredMatrix
from .block_diagonal import Block30DiagonalMatrix, BlockDiagonalMatrix
from .dense import DenseMatrix
from .diagonal import DiagonalMatrix
from .hierarchical import Hierarchical15_15Matrix, HierarchicalMatrix
from .triltoeplitz import TrilToeplitzMatrix
from .triutoeplitz import TriuToeplitzMatrix

STRUCTURES: Dict[str, Type[StructuredMatrix]] = {
    cls.name: cls
    for cls in (
        DenseMatrix,
        DiagonalMatrix,
        Block30DiagonalMatrix,
        Hierarchical15_15Matrix,
        TrilToeplitzMatrix,
        TriuToeplitzMatrix,
    )
}


def get_structure(name: str) -> Type[StructuredMatrix]:
    """The structure class registered under ``name``."""
    try:
        return STRUCTURES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown structure {name!r}; allowed: {sorted(STRUCTURES)}"
        ) from None


__all__ = [
    "STRUCTURES",
    "get_structure",
    "StructuredMatrix",
    "BlockDiagonalMatrix",
    "HierarchicalMatrix",
    *(cls.__name__ for cls in STRUCTURES.values()),
]

"""Optimizers for nmcompile: SINGD with curvature statistics captured in the compiled graph."""

from .singd import SINGD
from .structures import STRUCTURES

__all__ = ["SINGD", "STRUCTURES"]

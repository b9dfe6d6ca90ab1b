"""FX passes over the AOTAutograd joint graph (DESIGN.md §5)."""
from .config import NMConfig, parse_pattern
from .joint_pass import NMJointPass
from .records import GemmRecord
from .rewrite import rewrite_joint_graph

__all__ = ["NMConfig", "NMJointPass", "GemmRecord", "parse_pattern", "rewrite_joint_graph"]

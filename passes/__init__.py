"""FX passes over the AOTAutograd joint graph (docs/architecture.md, "The pass")."""
from .config import NMConfig, parse_pattern
from .joint_pass import NMJointPass
from .records import GemmRecord
from .rewrite import rewrite_joint_graph

__all__ = ["NMConfig", "NMJointPass", "GemmRecord", "parse_pattern", "rewrite_joint_graph"]

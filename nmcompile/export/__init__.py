"""Export the rewritten graphs: ONNX (nm ops in a custom domain, ``onnx_graph``), Model Explorer JSON
with node-data overlays (``model_explorer``), Graphviz DOT (``dot``); ``nodes`` says what an inserted
node is, for all of them and for the CLI and the profiler; ``code`` prints a graph as annotated code."""
from .code import graph_code
from .dot import to_dot
from .model_explorer import model_explorer_graph, node_data
from .nodes import NM_COLORS, NM_OPS, is_inserted, nm_attrs, nm_op_name
from .onnx_graph import onnx_op_counts, to_onnx

__all__ = ["graph_code", "to_dot", "model_explorer_graph", "node_data", "NM_COLORS", "NM_OPS", "is_inserted",
           "nm_attrs", "nm_op_name", "onnx_op_counts", "to_onnx"]

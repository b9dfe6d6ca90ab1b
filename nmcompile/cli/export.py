"""``nmcompile export``: write the rewritten graphs of a TARGET as ONNX, a Model Explorer collection with its
node-data overlays, Graphviz DOT, or the report as JSON."""
from __future__ import annotations

import json
import pathlib
import sys

from nmcompile.capture import records_by_node
from nmcompile.cli.common import capture, consoles
from nmcompile.cli.errors import CLIError


def _paths(out: pathlib.Path, count: int) -> list:
    """One output path per captured graph: PATH itself, then PATH with .g1, .g2 … before the suffix."""
    return [out if i == 0 else out.with_name(f"{out.stem}.g{i}{out.suffix}") for i in range(count)]


def holds_float8(gm) -> bool:
    """Whether a graph holds float8 values (``lowering="native"``), which ONNX's standard ops do not take."""
    import torch

    fp8 = (torch.float8_e4m3fn, torch.float8_e5m2)
    return any(isinstance(v, torch.Tensor) and v.dtype in fp8
               for node in gm.graph.nodes for v in torch.utils._pytree.tree_leaves(node.meta.get("val")))


def write_onnx(gm, path: pathlib.Path, graph_id: str, target: str, options: dict, strip_stack_traces: bool,
               err) -> None:
    """``gm`` as an ONNX model at ``path``, checked with onnx.checker (full_check); one line about it on ``err``."""
    import onnx

    from nmcompile.export import onnx_op_counts, to_onnx
    from nmcompile.version import __version__

    if holds_float8(gm):
        raise CLIError(
            "this graph holds float8 codes (lowering='native'), which ONNX's standard ops "
            "(Transpose, Gemm) do not take: export --format onnx with \"lowering\": \"emulate\" "
            "(the same values in the input dtype), or the native graph with --format model-explorer or dot"
        )

    model = to_onnx(
        gm,
        graph_id.replace("/", "_"),
        strip_stack_traces=strip_stack_traces,
        model_props={
            "nmcompile.version": __version__,
            "nmcompile.target": target,
            "nmcompile.graph": graph_id,
            "nmcompile.options": json.dumps(options),
        },
    )
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # a bug of ours, not the user's: say so in one line
        raise CLIError(
            f"the ONNX model for {graph_id} failed onnx.checker: {str(e).splitlines()[0]}"
        ) from e
    onnx.save(model, str(path))
    counts = onnx_op_counts(model)
    nm = {k.split("::")[1]: v for k, v in counts.items() if k.startswith("com.nmcompile::")}
    opaque = sum(v for k, v in counts.items() if k.startswith("com.nmcompile.aten::"))
    err.print(
        f"[dim]{path}: {sum(counts.values())} nodes, nm ops {nm or 'none'}, "
        f"{opaque} opaque aten nodes; onnx.checker (full_check) passed[/dim]"
    )


def run(args) -> int:
    _, err = consoles()
    out = pathlib.Path(args.output)
    if out.parent and not out.parent.exists():
        raise CLIError(f"output directory {str(out.parent)!r} does not exist")
    if args.format == "onnx":
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise CLIError("--format onnx needs the onnx package: pip install 'nmcompile[onnx]'") from None
    captured = capture(args, err)
    written = []
    if args.format == "json":
        out.write_text(captured.report.to_json() + "\n")
        written.append(out)
    elif args.format == "model-explorer":
        from nmcompile.export import model_explorer_graph, node_data
        from nmcompile.export.model_explorer import OVERLAYS, overlay_paths

        graphs, gms = [], {}
        for entry in captured.graphs:
            records = records_by_node(captured, entry.index)
            for kind in ("joint-before", "joint", "forward", "backward"):
                gm = entry.get(kind)
                if gm is not None:
                    graph_id = f"g{entry.index}/{kind}"
                    gms[graph_id] = gm
                    graphs.append(model_explorer_graph(gm, graph_id, records if kind != "joint-before" else {}))
        out.write_text(json.dumps({"label": f"nmcompile {args.target}", "graphs": graphs}, indent=1))
        overlays = dict(zip(OVERLAYS, node_data(gms)))
        for name, path in overlay_paths(out).items():
            path.write_text(json.dumps(overlays[name], indent=1))
            written.append(path)
        written.insert(0, out)
    else:
        present = [e for e in captured.graphs if e.get(args.graph) is not None]
        if not present:
            raise CLIError(
                f"the model produced no {args.graph} graph (an inference-only model has no joint/backward graph)"
            )
        for entry, path in zip(present, _paths(out, len(present))):
            gm = entry.get(args.graph)
            records = records_by_node(captured, entry.index) if args.graph != "joint-before" else {}
            graph_id = f"g{entry.index}/{args.graph}"
            if args.format == "dot":
                from nmcompile.export import to_dot

                path.write_text(to_dot(gm, graph_id, records))
            else:
                write_onnx(gm, path, graph_id, args.target, captured.options, args.strip_stack_traces, err)
            written.append(path)
    for path in written:
        sys.stdout.write(f"{path}\n")
    return 0

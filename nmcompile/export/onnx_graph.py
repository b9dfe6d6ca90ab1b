"""The FX graph as ONNX, built directly with ``onnx.helper``.

The aten ops of these training graphs map to standard ONNX ops where the semantics match exactly, the
nm ops become ``com.nmcompile`` nodes (MVUE, Greedy, LUQ, SAWB with their attributes), and anything
else becomes an opaque ``com.nmcompile.aten`` node named after the aten op (its non-tensor arguments
kept as attributes). The result passes ``onnx.checker.check_model(model, full_check=True)``.
"""
from __future__ import annotations

import json
import operator
from typing import Optional

import torch
import torch._inductor.decomposition  # noqa: F401  (defines prims.fma, which the captured graphs use)
import torch.fx as fx

from nmcompile.kernels.catalog import OPS
from nmcompile.passes.analysis import module_path
from nmcompile.passes.records import NodeInfo

from .nodes import _target_name, _tensor, nm_attrs, nm_spec

NM_DOMAIN = "com.nmcompile"
ATEN_DOMAIN = "com.nmcompile.aten"
ONNX_OPSET = 20
aten = torch.ops.aten
prims = torch.ops.prims

# -- ONNX --------------------------------------------------------------------------------------
def _onnx_dtype(dtype: torch.dtype) -> int:
    from onnx import TensorProto

    table = {
        torch.float32: TensorProto.FLOAT,
        torch.float64: TensorProto.DOUBLE,
        torch.float16: TensorProto.FLOAT16,
        torch.bfloat16: TensorProto.BFLOAT16,
        torch.int64: TensorProto.INT64,
        torch.int32: TensorProto.INT32,
        torch.int16: TensorProto.INT16,
        torch.int8: TensorProto.INT8,
        torch.uint8: TensorProto.UINT8,
        torch.bool: TensorProto.BOOL,
        torch.float8_e4m3fn: TensorProto.FLOAT8E4M3FN,
        torch.float8_e5m2: TensorProto.FLOAT8E5M2,
    }
    if dtype not in table:
        raise _Unsupported(f"dtype {dtype}")
    return table[dtype]


class _Unsupported(Exception):
    pass


def _static(shape) -> list:
    out = []
    for s in shape:
        if not isinstance(s, int):
            raise _Unsupported("symbolic size")
        out.append(s)
    return out


class _OnnxBuilder:
    def __init__(self, gm: fx.GraphModule, strip_stack_traces: bool):
        import onnx.helper as helper

        self.helper = helper
        self.gm = gm
        self.strip = strip_stack_traces
        self.nodes: list = []
        self.initializers: list = []
        self.value_info: list = []
        self.env: dict = {}  # fx node -> output name, or list of names for multi-output nodes
        self.counter = 0
        self.current: Optional[fx.Node] = None

    # helpers
    def fresh(self, hint: str) -> str:
        self.counter += 1
        return f"{hint}__{self.counter}"

    def const(self, values, dtype: torch.dtype, dims: Optional[list] = None) -> str:
        name = self.fresh("const")
        flat = values if isinstance(values, list) else [values]
        if dtype.is_floating_point:
            flat = [float(v) for v in flat]
        elif dtype == torch.bool:
            flat = [bool(v) for v in flat]
        else:
            flat = [int(v) for v in flat]
        dims = dims if dims is not None else ([len(flat)] if isinstance(values, list) else [])
        self.initializers.append(self.helper.make_tensor(name, _onnx_dtype(dtype), dims, flat))
        return name

    def ints(self, values) -> str:
        return self.const([int(v) for v in values], torch.int64)

    def emit(self, op_type: str, inputs: list, outputs: Optional[list] = None, domain: str = "", **attrs) -> list:
        outputs = outputs if outputs is not None else [self.fresh(self.current.name if self.current else op_type)]
        proto = self.helper.make_node(
            op_type,
            inputs,
            outputs,
            name=self.fresh(op_type) if self.current is None else f"{self.current.name}/{op_type}/{len(self.nodes)}",
            domain=domain,
            **attrs,
        )
        if self.current is not None:
            self._annotate(proto, self.current)
        self.nodes.append(proto)
        return outputs

    def _annotate(self, proto, node: fx.Node) -> None:
        props = {
            "pkg.nmcompile.fx_node": node.name,
            "pkg.nmcompile.fx_target": _target_name(node),
            "namespace": module_path(node),
        }
        if not self.strip and node.meta.get("stack_trace"):
            props["pkg.nmcompile.stack_trace"] = node.meta["stack_trace"].strip()
        info = nm_attrs(node)
        if info is not None:
            for key in ("op", "role", "module", "gemm", "pattern", "bits", "levels"):
                if key in info:
                    props[f"nm.{key}"] = str(info[key])
        elif NodeInfo.read(node) is not None:
            props["nm.for"] = NodeInfo.read(node).gemm
        for key, value in props.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value

    def value(self, arg) -> str:
        out = self.env[arg]
        if isinstance(out, list):
            raise _Unsupported("multi-output value used directly")
        return out

    def cast_to(self, name: str, src: Optional[torch.dtype], dst: torch.dtype) -> str:
        if src == dst:
            return name
        return self.emit("Cast", [name], to=_onnx_dtype(dst))[0]

    def operand(self, arg, dtype: torch.dtype) -> str:
        """A tensor input cast to ``dtype``, or a Python scalar as a constant of ``dtype``."""
        if isinstance(arg, fx.Node):
            t = _tensor(arg)
            return self.cast_to(self.value(arg), t.dtype if t is not None else None, dtype)
        if isinstance(arg, (int, float, bool)):
            return self.const(arg, dtype)
        raise _Unsupported(f"operand {arg!r}")

    # the graph
    def build(self, name: str, model_props: dict):
        from onnx import TensorProto

        h = self.helper
        inputs, outputs = [], []
        for node in self.gm.graph.nodes:
            self.current = node
            if node.op == "placeholder":
                t = _tensor(node)
                if t is None:
                    v = node.meta.get("val")
                    inputs.append(
                        h.make_tensor_value_info(
                            node.name,
                            TensorProto.INT64 if isinstance(v, (int, torch.SymInt)) else TensorProto.FLOAT,
                            [],
                        )
                    )
                else:
                    inputs.append(h.make_tensor_value_info(node.name, _onnx_dtype(t.dtype), self._dims(t)))
                self.env[node] = node.name
            elif node.op == "get_attr":
                value = getattr(self.gm, node.target)
                arr = value.detach().cpu()
                self.initializers.append(
                    h.make_tensor(node.name, _onnx_dtype(arr.dtype), list(arr.shape), arr.flatten().tolist())
                )
                self.env[node] = node.name
            elif node.op == "call_function":
                self._call(node)
            elif node.op == "output":
                seen = set()
                for i, arg in enumerate(torch.utils._pytree.tree_leaves(node.args[0])):
                    if not isinstance(arg, fx.Node):
                        continue
                    src = self.value(arg)
                    if src in seen or arg.op == "placeholder" or src in {i.name for i in inputs}:
                        src = self.emit("Identity", [src], [f"output_{i}"])[0]
                    seen.add(src)
                    t = _tensor(arg)
                    outputs.append(
                        h.make_tensor_value_info(src, _onnx_dtype(t.dtype), self._dims(t))
                        if t is not None
                        else h.make_tensor_value_info(src, TensorProto.FLOAT, None)
                    )
            else:
                raise _Unsupported(f"node kind {node.op}")
        out_names = {o.name for o in outputs}
        self.value_info = [vi for vi in self.value_info if vi.name not in out_names]
        graph = h.make_graph(
            self.nodes, name, inputs, outputs, initializer=self.initializers, value_info=self.value_info
        )
        model = h.make_model(
            graph,
            opset_imports=[
                h.make_opsetid("", ONNX_OPSET),
                h.make_opsetid(NM_DOMAIN, 1),
                h.make_opsetid(ATEN_DOMAIN, 1),
            ],
            producer_name="nmcompile",
        )
        h.set_model_props(model, model_props)
        return model

    @staticmethod
    def _dims(t: torch.Tensor) -> list:
        return [int(s) if isinstance(s, int) else str(s) for s in t.shape]

    def _call(self, node: fx.Node) -> None:
        if node.target is operator.getitem:
            src, index = node.args
            outs = self.env[src]
            self.env[node] = outs[index] if isinstance(outs, list) else outs
            return
        handler = _HANDLERS.get(node.target) or _nm_handler(node.target)
        n_nodes, n_init = len(self.nodes), len(self.initializers)
        result = None
        if handler is not None:
            try:
                result = handler(self, node, _tensor(node))
            except (_Unsupported, KeyError, AttributeError, TypeError, IndexError):
                del self.nodes[n_nodes:], self.initializers[n_init:]
                result = None
        if result is None:
            result = self._opaque(node)
        # name the node's final value after the FX node
        if isinstance(result, str):
            last = self.nodes[-1] if len(self.nodes) > n_nodes else None
            if last is not None and list(last.output) == [result]:
                last.output[0] = node.name
                result = node.name
            else:
                result = self.emit("Identity", [result], [node.name])[0]
        self.env[node] = result
        self._record_types(node, result)

    def _record_types(self, node: fx.Node, result) -> None:
        v = node.meta.get("val")
        names = result if isinstance(result, list) else [result]
        vals = v if isinstance(v, (list, tuple)) else [v]
        for name, t in zip(names, vals):
            if name and isinstance(t, torch.Tensor):
                self.value_info.append(self.helper.make_tensor_value_info(name, _onnx_dtype(t.dtype), self._dims(t)))

    def _opaque(self, node: fx.Node):
        tensor_inputs = []

        def visit(arg):
            if isinstance(arg, fx.Node):
                tensor_inputs.append(self.value(arg))
                return f"%{len(tensor_inputs) - 1}"
            return arg

        args = fx.node.map_aggregate(node.args, visit)
        kwargs = fx.node.map_aggregate(node.kwargs, visit)
        v = node.meta.get("val")
        if isinstance(v, (list, tuple)):
            outs = [f"{node.name}_{i}" if isinstance(t, torch.Tensor) else "" for i, t in enumerate(v)]
            while outs and outs[-1] == "":
                outs.pop()
        else:
            outs = [node.name]
        target = node.target
        op_type = target._opname if isinstance(target, torch._ops.OpOverload) else _target_name(node)
        overload = target._overloadname if isinstance(target, torch._ops.OpOverload) else ""
        namespace = target.namespace if isinstance(target, torch._ops.OpOverload) else "python"
        self.emit(
            op_type,
            tensor_inputs,
            outs or [node.name],
            domain=ATEN_DOMAIN,
            overload=overload,
            namespace=namespace,
            args=_repr(args),
            kwargs=_repr(kwargs),
        )
        return outs if isinstance(v, (list, tuple)) else outs[0]


def _repr(value) -> str:
    def clean(v):
        if isinstance(v, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (int, float, bool, str)) or v is None:
            return v
        return str(v)

    return json.dumps(clean(value))


# handlers: (builder, node, output fake tensor) -> output name (str) / list of names / None
def _binary(op_type: str):
    def handle(b: _OnnxBuilder, node: fx.Node, out):
        if len(node.args) != 2 or set(node.kwargs) - {"alpha"} or node.kwargs.get("alpha", 1) != 1:
            raise _Unsupported("alpha / extra args")
        return b.emit(op_type, [b.operand(a, out.dtype) for a in node.args])[0]

    return handle


def _compare(op_type: str, negate: bool = False):
    def handle(b, node, out):
        x, y = node.args
        dtype = _tensor(x).dtype if isinstance(x, fx.Node) else _tensor(y).dtype
        if isinstance(y, fx.Node) and isinstance(x, fx.Node) and _tensor(y).dtype != dtype:
            dtype = torch.promote_types(dtype, _tensor(y).dtype)
        name = b.emit(op_type, [b.operand(x, dtype), b.operand(y, dtype)])[0]
        return b.emit("Not", [name])[0] if negate else name

    return handle


def _unary(op_type: str, **attrs):
    def handle(b, node, out):
        if len(node.args) != 1:
            raise _Unsupported("extra args")
        return b.emit(op_type, [b.operand(node.args[0], out.dtype)], **attrs)[0]

    return handle


def _identity(b, node, out):
    return b.emit("Identity", [b.value(node.args[0])])[0]


def _reshape(b, node, out):
    return b.emit("Reshape", [b.value(node.args[0]), b.ints(_static(out.shape))])[0]


def _expand(b, node, out):
    return b.emit("Expand", [b.value(node.args[0]), b.ints(_static(out.shape))])[0]


def _permute(b, node, out):
    rank = out.dim()
    return b.emit("Transpose", [b.value(node.args[0])], perm=[d % rank for d in node.args[1]])[0]


def _t(b, node, out):
    if out.dim() < 2:
        return _identity(b, node, out)
    return b.emit("Transpose", [b.value(node.args[0])], perm=[1, 0])[0]


def _transpose(b, node, out):
    rank = out.dim()
    perm = list(range(rank))
    d0, d1 = node.args[1] % rank, node.args[2] % rank
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return b.emit("Transpose", [b.value(node.args[0])], perm=perm)[0]


def _matmul(b, node, out):
    return b.emit("MatMul", [b.value(node.args[0]), b.value(node.args[1])])[0]


def _int_mm(b, node, out):
    # ONNX's int8 x int8 -> int32 product, zero points 0: the exact sums of an int8 GEMM
    return b.emit("MatMulInteger", [b.value(node.args[0]), b.value(node.args[1])])[0]


def _addmm(b, node, out):
    bias, m1, m2 = node.args[:3]
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    return b.emit("Gemm", [b.value(m1), b.value(m2), b.operand(bias, out.dtype)], alpha=float(alpha), beta=float(beta))[
        0
    ]


def _reduce(op_type: str):
    def handle(b, node, out):
        x = node.args[0]
        if node.target in (aten.sum.default,):
            if node.kwargs.get("dtype") is not None:
                raise _Unsupported("dtype")
            return b.emit(op_type, [b.operand(x, out.dtype)], keepdims=0)[0]
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if node.kwargs.get("dtype") is not None or not dims:
            raise _Unsupported("dtype / all dims")
        rank = _tensor(x).dim()
        return b.emit(op_type, [b.operand(x, out.dtype), b.ints([d % rank for d in dims])], keepdims=int(bool(keep)))[0]

    return handle


def _unsqueeze(b, node, out):
    return b.emit("Unsqueeze", [b.value(node.args[0]), b.ints([node.args[1] % out.dim()])])[0]


def _squeeze(b, node, out):
    x = _tensor(node.args[0])
    dims = node.args[1] if len(node.args) > 1 else [i for i, s in enumerate(x.shape) if s == 1]
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = [d % max(x.dim(), 1) for d in dims if x.shape[d] == 1]
    if not dims:
        return _identity(b, node, out)
    return b.emit("Squeeze", [b.value(node.args[0]), b.ints(dims)])[0]


def _convert(b, node, out):
    return b.emit("Cast", [b.value(node.args[0])], to=_onnx_dtype(out.dtype))[0]


def _full(b, node, out):
    from onnx import helper

    value = helper.make_tensor("value", _onnx_dtype(out.dtype), [1], [node.args[1]])
    return b.emit("ConstantOfShape", [b.ints(_static(out.shape))], value=value)[0]


def _scalar_tensor(b, node, out):
    name = b.const(node.args[0], out.dtype)
    return b.emit("Identity", [name])[0]


def _where(b, node, out):
    cond, x, y = node.args
    return b.emit("Where", [b.value(cond), b.operand(x, out.dtype), b.operand(y, out.dtype)])[0]


def _gather(b, node, out):
    x, dim, index = node.args[:3]
    if len(node.args) > 3 or node.kwargs:
        raise _Unsupported("sparse_grad")
    return b.emit("GatherElements", [b.value(x), b.value(index)], axis=dim % out.dim())[0]


def _scatter_value(b, node, out):
    x, dim, index, value = node.args
    updates = b.emit(
        "ConstantOfShape",
        [b.ints(_static(_tensor(index).shape))],
        value=b.helper.make_tensor("value", _onnx_dtype(out.dtype), [1], [value]),
    )[0]
    return b.emit("ScatterElements", [b.value(x), b.value(index), updates], axis=dim % out.dim())[0]


def _scatter_add(b, node, out):
    x, dim, index, src = node.args
    return b.emit("ScatterElements", [b.value(x), b.value(index), b.value(src)], axis=dim % out.dim(), reduction="add")[
        0
    ]


def _embedding(b, node, out):
    if len(node.args) > 2 and node.args[2] != -1:
        raise _Unsupported("padding_idx")
    return b.emit("Gather", [b.value(node.args[0]), b.value(node.args[1])], axis=0)[0]


def _cat(b, node, out):
    dim = node.args[1] if len(node.args) > 1 else 0
    parts = [b.operand(t, out.dtype) for t in node.args[0]]
    return b.emit("Concat", parts, axis=dim % out.dim())[0]


def _split(b, node, out):
    x, size = node.args[:2]
    dim = node.args[2] if len(node.args) > 2 else 0
    vals = node.meta["val"]
    sizes = [int(t.shape[dim]) for t in vals]
    outs = [f"{node.name}_{i}" for i in range(len(vals))]
    b.emit("Split", [b.value(x), b.ints(sizes)], outs, axis=dim % _tensor(x).dim())
    return outs


def _conv(b, node, out):
    x, w, bias, stride, padding, dilation, transposed, output_padding, groups = node.args
    if transposed or not isinstance(padding, (list, tuple)):
        raise _Unsupported("transposed / string padding")
    inputs = [b.value(x), b.value(w)] + ([b.value(bias)] if bias is not None else [])
    return b.emit(
        "Conv", inputs, strides=list(stride), pads=list(padding) * 2, dilations=list(dilation), group=int(groups)
    )[0]


def _threshold_backward(b, node, out):
    grad, x, threshold = node.args
    keep = b.emit("Greater", [b.value(x), b.const(threshold, _tensor(x).dtype)])[0]
    return b.emit("Where", [keep, b.value(grad), b.const(0, out.dtype)])[0]


def _rsqrt(b, node, out):
    return b.emit("Reciprocal", [b.emit("Sqrt", [b.value(node.args[0])])[0]])[0]


def _fma(b, node, out):
    x, y, z = (b.operand(a, out.dtype) for a in node.args)
    return b.emit("Add", [b.emit("Mul", [x, y])[0], z])[0]


def _softmax(op_type: str):
    def handle(b, node, out):
        x, dim = node.args[:2]
        return b.emit(op_type, [b.operand(x, out.dtype)], axis=dim % out.dim())[0]

    return handle


def _gelu(b, node, out):
    return b.emit("Gelu", [b.value(node.args[0])], approximate=node.kwargs.get("approximate", "none"))[0]


def _given(value) -> bool:
    """An nm parameter worth an attribute: set (dim None: per tensor) and not a flag left off (pow2 False)."""
    return value is not None and value is not False


def _nm(b: _OnnxBuilder, node: fx.Node, out):
    """An nm op as its catalog entry says: ONNX op type, inputs x (and the seeds of a sampling op),
    its parameters as attributes."""
    info, spec = nm_attrs(node), nm_spec(node)
    inputs = 2 if spec.sampled else 1
    return b.emit(spec.onnx_type, [b.value(a) for a in node.args[:inputs]], domain=NM_DOMAIN,
                  **{key: info[key] for key in spec.onnx_attrs if _given(info.get(key))})[0]


def _nm_handler(target):
    """The handler of an nm op or of one of its codes forms, looked up in the catalog as the graph is exported
    (so an op registered after import is exported too), None for other targets."""
    for spec in OPS.values():
        if target is spec.op:
            return _nm
        for name, codes in ((spec.codes_op, "float8"), (spec.int8_op, "int8")):
            if name is not None and target is getattr(torch.ops.nm, name).default:
                return _codes(spec, codes)
    return None


def _codes(spec, codes: str):
    """A quantizer's codes form (``nm.luq_int8``, ``nm.sawb_fp8``, ...): the quantizer's node with a
    ``codes`` attribute ("int8" / "float8") and two outputs, the codes and their fp32 scale."""

    def handle(b: _OnnxBuilder, node: fx.Node, out):
        params = dict(zip(spec.args, node.args[1:]))
        inputs = 2 if spec.sampled else 1
        return b.emit(spec.onnx_type, [b.value(a) for a in node.args[:inputs]], [f"{node.name}_0", f"{node.name}_1"],
                      domain=NM_DOMAIN, codes=codes,
                      **{key: params[key] for key in spec.onnx_attrs if _given(params.get(key))})

    return handle


_HANDLERS: dict = {
    aten.mm.default: _matmul,
    aten.bmm.default: _matmul,
    aten.addmm.default: _addmm,
    aten._int_mm.default: _int_mm,
    aten.permute.default: _permute,
    aten.t.default: _t,
    aten.transpose.int: _transpose,
    aten.view.default: _reshape,
    aten._unsafe_view.default: _reshape,
    aten.reshape.default: _reshape,
    aten.expand.default: _expand,
    aten.clone.default: _identity,
    aten.alias.default: _identity,
    aten.detach.default: _identity,
    aten.relu.default: _unary("Relu"),
    aten.neg.default: _unary("Neg"),
    aten.exp.default: _unary("Exp"),
    aten.log.default: _unary("Log"),
    aten.erf.default: _unary("Erf"),
    aten.sqrt.default: _unary("Sqrt"),
    aten.tanh.default: _unary("Tanh"),
    aten.sigmoid.default: _unary("Sigmoid"),
    aten.abs.default: _unary("Abs"),
    aten.rsqrt.default: _rsqrt,
    aten.reciprocal.default: _unary("Reciprocal"),
    aten.add.Tensor: _binary("Add"),
    aten.sub.Tensor: _binary("Sub"),
    aten.mul.Tensor: _binary("Mul"),
    aten.div.Tensor: _binary("Div"),
    aten.add.Scalar: _binary("Add"),
    aten.mul.Scalar: _binary("Mul"),
    aten.le.Scalar: _compare("LessOrEqual"),
    aten.lt.Scalar: _compare("Less"),
    aten.ge.Scalar: _compare("GreaterOrEqual"),
    aten.gt.Scalar: _compare("Greater"),
    aten.eq.Scalar: _compare("Equal"),
    aten.ne.Scalar: _compare("Equal", True),
    aten.le.Tensor: _compare("LessOrEqual"),
    aten.lt.Tensor: _compare("Less"),
    aten.ge.Tensor: _compare("GreaterOrEqual"),
    aten.gt.Tensor: _compare("Greater"),
    aten.eq.Tensor: _compare("Equal"),
    aten.ne.Tensor: _compare("Equal", True),
    aten.where.self: _where,
    aten.sum.default: _reduce("ReduceSum"),
    aten.sum.dim_IntList: _reduce("ReduceSum"),
    aten.amax.default: _reduce("ReduceMax"),
    aten.unsqueeze.default: _unsqueeze,
    aten.squeeze.dim: _squeeze,
    aten.squeeze.dims: _squeeze,
    prims.convert_element_type.default: _convert,
    aten._to_copy.default: None,
    aten.full.default: _full,
    aten.scalar_tensor.default: _scalar_tensor,
    aten.gather.default: _gather,
    aten.scatter.value: _scatter_value,
    aten.scatter_add.default: _scatter_add,
    aten.embedding.default: _embedding,
    aten.cat.default: _cat,
    aten.split.Tensor: _split,
    aten.convolution.default: _conv,
    aten.threshold_backward.default: _threshold_backward,
    prims.fma.default: _fma,
    aten._softmax.default: _softmax("Softmax"),
    aten._log_softmax.default: _softmax("LogSoftmax"),
    aten.gelu.default: _gelu,
}
_HANDLERS = {k: v for k, v in _HANDLERS.items() if v is not None}
for _op in (aten.bitwise_not.default, aten.logical_not.default):
    _HANDLERS[_op] = lambda b, node, out: b.emit("Not", [b.value(node.args[0])])[0] if out.dtype == torch.bool else None
for _op in (aten.bitwise_and.Tensor, aten.logical_and.default):
    _HANDLERS[_op] = lambda b, node, out: (
        b.emit("And", [b.operand(a, torch.bool) for a in node.args])[0] if out.dtype == torch.bool else None
    )
for _op in (aten.bitwise_or.Tensor, aten.logical_or.default):
    _HANDLERS[_op] = lambda b, node, out: (
        b.emit("Or", [b.operand(a, torch.bool) for a in node.args])[0] if out.dtype == torch.bool else None
    )


def to_onnx(
    gm: fx.GraphModule, name: str = "nmcompile", *, strip_stack_traces: bool = False, model_props: Optional[dict] = None
):
    """The FX graph ``gm`` as an ``onnx.ModelProto`` (see the module docstring)."""
    return _OnnxBuilder(gm, strip_stack_traces).build(name, {"producer": "nmcompile", **(model_props or {})})


def onnx_op_counts(model) -> dict:
    counts: dict = {}
    for node in model.graph.node:
        key = f"{node.domain or 'ai.onnx'}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return counts



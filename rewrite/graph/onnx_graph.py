"""ONNX adapter: an ``onnx_ir.Model`` seen through :class:`~rewrite.graph.base.GraphView`.

Values are ``onnx_ir.Value``; nodes are ``onnx_ir.Node`` of the main graph. Constants are read from initializers
and ``Constant`` nodes only when they are small (weights are never materialized for matching: external data stays
lazy). Scalar expressions computed from static shapes (``Shape → Gather → Cast → Sqrt → Div``, as legacy SDPA
exports spell the scale) are evaluated.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import onnx_ir as ir

from .base import Canon, Dim, normalize_axis

log = logging.getLogger(__name__)

_SMALL = 1 << 16  # elements: larger constants are never read while matching


def _attr(node: ir.Node, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def _rank(v: ir.Value | None) -> int | None:
    if v is None or v.shape is None:
        return None
    return len(v.shape)


def _opset(node: ir.Node, graph: "OnnxGraph") -> int:
    return graph.opsets.get(node.domain or "", graph.opsets.get("", 17))


def _inputs(node: ir.Node, *idx: int) -> tuple[Any, ...]:
    return tuple(node.inputs[i] if i < len(node.inputs) else None for i in idx)


def _softmax(log_: bool) -> Callable[[ir.Node, "OnnxGraph"], Canon | None]:
    def make(node: ir.Node, g: "OnnxGraph") -> Canon | None:
        r = _rank(node.inputs[0])
        default = -1 if _opset(node, g) >= 13 else 1
        axis = int(_attr(node, "axis", default))
        if _opset(node, g) < 13 and r is not None and normalize_axis(axis, r) != r - 1:
            return Canon("softmax", (node.inputs[0],), {"axis": -999, "log": log_})  # flattening semantics
        return Canon("softmax", (node.inputs[0],), {"axis": normalize_axis(axis, r), "log": log_})
    return make


def _transpose(node: ir.Node, g: "OnnxGraph") -> Canon | None:
    perm = _attr(node, "perm")
    if perm is None:
        r = _rank(node.inputs[0])
        if r is None:
            return None
        perm = list(reversed(range(r)))
    return Canon("transpose", (node.inputs[0],), {"perm": tuple(int(p) for p in perm)})


def _gather(node: ir.Node, g: "OnnxGraph") -> Canon | None:
    idx = node.inputs[1]
    arr = g.const_array(idx, 1)
    if arr is None or arr.ndim != 0:
        return Canon("gather", (node.inputs[0], idx), {})
    return Canon("select", (node.inputs[0],), {"axis": normalize_axis(int(_attr(node, "axis", 0)), _rank(node.inputs[0])),
                                               "index": int(arr)})


def _dropout(node: ir.Node, g: "OnnxGraph") -> Canon:
    ratio = g.scalar(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else 0.5
    training = node.inputs[2] if len(node.inputs) > 2 else None
    train = bool(g.scalar(training)) if training is not None and g.scalar(training) is not None else training is not None
    return Canon("dropout", (node.inputs[0],), {"p": 0.5 if ratio is None else float(ratio), "train": train})


def _gemm(node: ir.Node, g: "OnnxGraph") -> Canon:
    trans_b = int(_attr(node, "transB", 0))
    return Canon("linear", _inputs(node, 0, 1, 2), {"weight_layout": "out_in" if trans_b else "in_out",
                                                   "trans_a": int(_attr(node, "transA", 0))})


def _reduce_max(node: ir.Node, g: "OnnxGraph") -> Canon | None:
    """ReduceMax of a bool cast to numbers over one axis is ``any`` (how exporters write ``torch.any``); other
    reductions are outside the vocabulary."""
    x = node.inputs[0]
    cast = x.producer() if x is not None else None
    if cast is None or cast.op_type != "Cast" or cast.inputs[0] is None or cast.inputs[0].dtype != ir.DataType.BOOL:
        return None
    axes = g.const_array(node.inputs[1], 8) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if axes is None:
        axes = _attr(node, "axes")
    if axes is None or len(list(np.asarray(axes).reshape(-1))) != 1:
        return None
    axis = normalize_axis(int(np.asarray(axes).reshape(-1)[0]), _rank(x))
    return Canon("any", (cast.inputs[0],), {"axis": axis, "keepdim": bool(_attr(node, "keepdims", 1))})


def _simple(kind: str, n_in: int = 1, **attrs: Any) -> Callable[[ir.Node, "OnnxGraph"], Canon]:
    return lambda node, g: Canon(kind, _inputs(node, *range(n_in)), dict(attrs))


def _fused(kind: str) -> Callable[[ir.Node, "OnnxGraph"], Canon]:
    return lambda node, g: Canon(kind, tuple(node.inputs), {k: a.value for k, a in node.attributes.items()})


_TABLE: dict[tuple[str, str], Callable[[ir.Node, "OnnxGraph"], Canon | None]] = {
    ("", "MatMul"): _simple("matmul", 2),
    ("", "Gemm"): _gemm,
    ("", "Softmax"): _softmax(False),
    ("", "LogSoftmax"): _softmax(True),
    ("", "Mul"): _simple("mul", 2),
    ("", "Div"): _simple("div", 2),
    ("", "Add"): _simple("add", 2, alpha=1),
    ("", "Sub"): _simple("sub", 2, alpha=1),
    ("", "Where"): _simple("where", 3),
    ("", "Cast"): lambda node, g: Canon("cast", (node.inputs[0],), {"dtype": str(ir.DataType(_attr(node, "to")))}),
    ("", "CastLike"): _simple("cast", 1, dtype=None),
    ("", "Transpose"): _transpose,
    ("", "Reshape"): _simple("reshape", 1),
    ("", "Flatten"): _simple("reshape", 1),
    ("", "Gather"): _gather,
    ("", "Dropout"): _dropout,
    ("", "Identity"): _simple("identity", 1, why="identity"),
    ("", "Expand"): _simple("expand", 1),
    ("", "Unsqueeze"): _simple("unsqueeze", 1),
    ("", "IsNaN"): _simple("isnan", 1),
    ("", "Not"): _simple("not", 1),
    ("", "Sqrt"): _simple("sqrt", 1),
    ("", "Reciprocal"): _simple("reciprocal", 1),
    ("", "Equal"): _simple("compare", 2, op="eq"),
    ("", "Less"): _simple("compare", 2, op="lt"),
    ("", "LessOrEqual"): _simple("compare", 2, op="le"),
    ("", "Greater"): _simple("compare", 2, op="gt"),
    ("", "GreaterOrEqual"): _simple("compare", 2, op="ge"),
    ("", "Trilu"): lambda node, g: Canon("trilu", (node.inputs[0],), {"upper": bool(_attr(node, "upper", 1))}),
    ("", "Range"): _simple("arange", 0),
    ("", "ReduceMax"): _reduce_max,
    ("", "NonMaxSuppression"): lambda node, g: Canon("nms", _inputs(node, 0, 1, 2, 3, 4),
                                                     {"center_point_box": int(_attr(node, "center_point_box", 0))}),
    ("", "Attention"): _fused("onnx_attention"),
    ("com.microsoft", "Attention"): _fused("ort_attention"),
    ("com.microsoft", "MultiHeadAttention"): _fused("ort_mha"),
}


def _infer_transpose(g: "OnnxGraph", node: ir.Node) -> tuple | None:
    in_shape = g.shape(node.inputs[0])
    canon = g.canon(node)
    if in_shape is None or canon is None or len(canon.attrs["perm"]) != len(in_shape):
        return None
    return tuple(in_shape[p] for p in canon.attrs["perm"])


def _infer_gather(g: "OnnxGraph", node: ir.Node) -> tuple | None:
    in_shape = g.shape(node.inputs[0])
    idx = g.const_array(node.inputs[1], 1)
    if in_shape is None or idx is None or idx.ndim != 0:
        return None
    axis = normalize_axis(int(_attr(node, "axis", 0)), len(in_shape))
    return in_shape[:axis] + in_shape[axis + 1:]


def _axes(g: "OnnxGraph", node: ir.Node) -> list[int] | None:
    axes = _attr(node, "axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = g.const_array(node.inputs[1], 16)
        axes = None if arr is None else [int(a) for a in np.atleast_1d(arr)]
    return None if axes is None else list(axes)


def _infer_squeeze(g: "OnnxGraph", node: ir.Node) -> tuple | None:
    in_shape = g.shape(node.inputs[0])
    axes = _axes(g, node)
    if in_shape is None or axes is None:
        return None
    drop = {normalize_axis(a, len(in_shape)) for a in axes}
    return tuple(d for i, d in enumerate(in_shape) if i not in drop)


def _infer_unsqueeze(g: "OnnxGraph", node: ir.Node) -> tuple | None:
    in_shape = g.shape(node.inputs[0])
    axes = _axes(g, node)
    if in_shape is None or axes is None:
        return None
    out: list = list(in_shape)
    for a in sorted(normalize_axis(a, len(in_shape) + len(axes)) for a in axes):
        out.insert(a, 1)
    return tuple(out)


def _infer_elementwise(g: "OnnxGraph", node: ir.Node) -> tuple | None:
    shapes = [g.shape(v) for v in node.inputs if v is not None]
    if not shapes or any(s is None for s in shapes):
        return None
    rank = max(len(s) for s in shapes)
    out = []
    for axis in range(rank):
        dims = [s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0]
        known = [d for d in dims if d != 1]
        out.append(known[0] if known and all(d == known[0] for d in known) else (1 if not known else None))
    return tuple(out)


_SHAPE_RULES = {"Transpose": _infer_transpose, "Gather": _infer_gather, "Squeeze": _infer_squeeze,
                "Unsqueeze": _infer_unsqueeze, "Add": _infer_elementwise, "Mul": _infer_elementwise,
                "Div": _infer_elementwise, "Sub": _infer_elementwise, "Cast": lambda g, n: g.shape(n.inputs[0]),
                "Identity": lambda g, n: g.shape(n.inputs[0])}


def _sym_name(dim: Any) -> str | None:
    """A symbolic dim's name; None for unnamed dims and the ``unk__N`` placeholders of ONNX shape inference."""
    name = getattr(dim, "value", dim)
    if name is None:
        return None
    text = str(name)
    return None if text in ("", "None") or text.startswith("unk__") else text


class OnnxGraph:
    """:class:`GraphView` over the main graph of an ``onnx_ir.Model`` (functions are not searched)."""

    kind = "onnx"

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.graph = model.graph
        self.opsets = dict(model.opset_imports)
        self._outputs = {id(v) for v in self.graph.outputs}
        self._inputs = {id(v) for v in self.graph.inputs}
        self._live: set[int] = set()
        for node in reversed(list(self.graph)):  # liveness: nodes whose outputs reach a graph output
            if any(id(o) in self._outputs or any(id(u.node) in self._live for u in o.uses()) for o in node.outputs):
                self._live.add(id(node))
        self._canon: dict[int, Canon | None] = {}
        self._scalar_cache: dict[int, float | None] = {}
        self._shape_cache: dict[int, Any] = {}
        for node in self.graph:
            fn = _TABLE.get((node.domain if node.domain not in ("ai.onnx",) else "", node.op_type))
            try:
                self._canon[id(node)] = fn(node, self) if fn is not None else None
            except (TypeError, ValueError, IndexError):
                self._canon[id(node)] = None

    def nodes(self) -> Iterator[ir.Node]:
        return iter(self.graph)

    def canon(self, node: ir.Node | None) -> Canon | None:
        return None if node is None else self._canon.get(id(node))

    def op_name(self, node: ir.Node) -> str:
        return f"{node.domain}::{node.op_type}" if node.domain else node.op_type

    def node_name(self, node: ir.Node) -> str:
        return node.name or f"<{node.op_type} → {node.outputs[0].name if node.outputs else '?'}>"

    def outputs(self, node: ir.Node) -> Sequence[ir.Value]:
        return node.outputs

    def producer(self, value: Any) -> ir.Node | None:
        if not isinstance(value, ir.Value):
            return None
        node = value.producer()
        return node if node is not None and node.graph is self.graph else None

    def raw_inputs(self, node: ir.Node) -> list[Any]:
        return [v for v in node.inputs if v is not None]

    def users(self, value: ir.Value) -> list[ir.Node]:
        """Users that contribute to a graph output (dead code is not a user)."""
        seen: dict[int, ir.Node] = {}
        for use in value.uses():
            if id(use.node) in self._live:
                seen.setdefault(id(use.node), use.node)
        return list(seen.values())

    def is_graph_output(self, value: Any) -> bool:
        return id(value) in self._outputs

    def is_graph_input(self, value: Any) -> bool:
        return id(value) in self._inputs

    def is_constant(self, value: Any) -> bool:
        if not isinstance(value, ir.Value):
            return False
        if value.const_value is not None or value.is_initializer():
            return not self.is_graph_input(value)
        node = self.producer(value)
        return node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx")

    def const_array(self, value: Any, max_elements: int = _SMALL) -> np.ndarray | None:
        if not isinstance(value, ir.Value) or self.is_graph_input(value):
            return None
        tensor = value.const_value
        if tensor is None:
            node = self.producer(value)
            if node is None or node.op_type != "Constant":
                return None
            attr = next(iter(node.attributes.values()), None)
            if attr is None:
                return None
            if attr.name in ("value_float", "value_int"):
                return np.asarray(attr.value)
            if attr.name in ("value_floats", "value_ints"):
                return np.asarray(list(attr.value))
            tensor = attr.value
        if tensor is None or tensor.size > max_elements:
            return None
        return tensor.numpy()

    def scalar(self, value: Any, depth: int = 0) -> float | None:
        """The value of a scalar expression: constants and arithmetic on static shape entries."""
        if value is None or depth > 12:
            return None
        cached = self._scalar_cache.get(id(value), ...)
        if cached is not ...:
            return cached
        result = self._scalar(value, depth)
        self._scalar_cache[id(value)] = result
        return result

    def _scalar(self, value: Any, depth: int) -> float | None:
        arr = self.const_array(value, 1)
        if arr is not None:
            return float(arr.reshape(-1)[0]) if arr.size == 1 else None
        vec = self._shape_vector(value, depth, symbolic=True)
        if vec is not None and len(vec) == 1 and isinstance(vec[0], (int, float)):
            return float(vec[0])
        node = self.producer(value)
        if node is None:
            return None
        op = node.op_type
        if op in ("Cast", "Identity", "Squeeze", "Unsqueeze", "Reshape", "CastLike"):
            return self.scalar(node.inputs[0], depth + 1)
        if op in ("Sqrt", "Reciprocal", "Neg"):
            x = self.scalar(node.inputs[0], depth + 1)
            if x is None:
                return None
            if op == "Neg":
                return -x
            return (x ** 0.5 if op == "Sqrt" else 1.0 / x) if x > 0 else None
        if op in ("Mul", "Div", "Add", "Sub", "Pow"):
            a, b = self.scalar(node.inputs[0], depth + 1), self.scalar(node.inputs[1], depth + 1)
            if a is None or b is None:
                return None
            if op == "Div":
                return a / b if b else None
            return {"Mul": a * b, "Add": a + b, "Sub": a - b, "Pow": a ** b if a > 0 else None}[op]
        return None

    def _shape_vector(self, value: Any, depth: int, symbolic: bool = False) -> list[Any] | None:
        """The vector of a shape expression (``Shape``, ``Gather``, ``Slice``, ``Concat``, constants). Entries are
        ints, or symbolic dim names when ``symbolic``; None if it cannot be read."""
        if depth > 16:
            return None
        arr = self.const_array(value, 16)
        if arr is not None and arr.ndim <= 1 and np.issubdtype(arr.dtype, np.integer):
            return [int(x) for x in np.atleast_1d(arr)]
        node = self.producer(value)
        if node is None:
            return None
        if node.op_type == "Shape":
            shape = self.shape(node.inputs[0])
            if shape is None:
                return None
            start = int(_attr(node, "start", 0))
            end = _attr(node, "end", None)
            dims = list(shape)[start:(None if end is None else int(end))]
            if any(d is None for d in dims):
                return None
            return dims
        if node.op_type in ("Gather", "Slice"):
            base = self._shape_vector(node.inputs[0], depth + 1, symbolic)
            if base is None:
                return None
            if node.op_type == "Gather":
                idx = self.const_array(node.inputs[1], 64)
                return None if idx is None else [base[int(i)] for i in np.atleast_1d(idx)]
            starts, ends = (self._shape_vector(node.inputs[i], depth + 1, False) for i in (1, 2))
            if not starts or not ends or not isinstance(starts[0], int) or not isinstance(ends[0], int):
                return None
            return base[starts[0]:min(ends[0], len(base))]
        if node.op_type == "Concat":
            out: list[Any] = []
            for part in node.inputs:
                vec = self._shape_vector(part, depth + 1, symbolic)
                if vec is None:
                    return None
                out.extend(vec)
            return out
        if node.op_type in ("Cast", "Squeeze", "Unsqueeze", "Identity", "Reshape"):
            return self._shape_vector(node.inputs[0], depth + 1, symbolic)
        if node.op_type in ("Add", "Sub", "Mod"):
            a = self._shape_vector(node.inputs[0], depth + 1, False)
            b = self._shape_vector(node.inputs[1], depth + 1, False)
            if a and b and len(b) == 1 and all(isinstance(x, int) for x in a + b):
                op = {"Add": lambda x, y: x + y, "Sub": lambda x, y: x - y,
                      "Mod": lambda x, y: x % y if y else None}[node.op_type]
                out = [op(x, b[0]) for x in a]
                return None if None in out else out
            return None
        if node.op_type in ("Mul", "Div"):
            a = self._shape_vector(node.inputs[0], depth + 1, symbolic)
            b = self._shape_vector(node.inputs[1], depth + 1, symbolic)
            if a is not None and b is not None and len(a) == len(b) == 1:
                if isinstance(a[0], int) and isinstance(b[0], int):
                    if node.op_type == "Div":
                        return [a[0] // b[0]] if b[0] else None
                    return [a[0] * b[0]]
                if symbolic:
                    return [f"{a[0]}{'*' if node.op_type == 'Mul' else '/'}{b[0]}"]
        return None

    def _reshape_shape(self, node: ir.Node) -> tuple[Dim, ...] | None:
        """The output shape of a Reshape from its target vector (-1 and 0 resolved where possible)."""
        target = self._shape_vector(node.inputs[1], 0, symbolic=True) if len(node.inputs) > 1 else None
        if target is None:
            return None
        in_shape = self.shape(node.inputs[0])
        dims: list[Dim] = []
        for i, d in enumerate(target):
            if d == 0 and in_shape is not None and i < len(in_shape) and not int(_attr(node, "allowzero", 0)):
                d = in_shape[i]
            dims.append(None if d == -1 else d)
        if dims.count(None) == 1 and in_shape is not None and None not in in_shape:
            in_syms = sorted(str(d) for d in in_shape if not isinstance(d, int))
            out_syms = sorted(str(d) for d in dims if d is not None and not isinstance(d, int))
            if in_syms == out_syms:  # the symbolic dims cancel: -1 is a ratio of static sizes
                known = int(np.prod([d for d in dims if isinstance(d, int)]))
                total = int(np.prod([d for d in in_shape if isinstance(d, int)]))
                dims[dims.index(None)] = total // known if known and total % known == 0 else None
        return tuple(dims)

    def shape(self, value: Any) -> tuple[Dim, ...] | None:
        if not isinstance(value, ir.Value):
            return None
        cached = self._shape_cache.get(id(value), ...)
        if cached is not ...:
            return cached
        dims = None
        if value.shape is not None:
            dims = tuple(d if isinstance(d, int) else _sym_name(d) for d in value.shape)
        if dims is None or any(d is None for d in dims):
            node = self.producer(value)
            if node is not None and node.op_type == "Reshape":
                self._shape_cache[id(value)] = dims  # guards recursion
                inferred = self._reshape_shape(node)
                if inferred is not None and (dims is None or len(inferred) == len(dims)):
                    dims = tuple(a if a is not None else b for a, b in zip(inferred, dims or inferred))
            elif node is not None and node.op_type in _SHAPE_RULES and value is node.outputs[0]:
                self._shape_cache[id(value)] = dims
                inferred = _SHAPE_RULES[node.op_type](self, node)
                if inferred is not None and (dims is None or len(inferred) == len(dims)):
                    dims = tuple(a if a is not None else b for a, b in zip(inferred, dims or inferred))
        self._shape_cache[id(value)] = dims
        return dims

    def dtype(self, value: Any) -> str | None:
        if not isinstance(value, ir.Value) or value.dtype is None:
            return None
        return {ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16",
                ir.DataType.DOUBLE: "float64", ir.DataType.BOOL: "bool", ir.DataType.INT64: "int64",
                ir.DataType.INT32: "int32"}.get(value.dtype, str(value.dtype).lower())

    def value_name(self, value: Any) -> str:
        return value.name or "<unnamed>"

    def key(self, value: Any) -> Any:
        return id(value)

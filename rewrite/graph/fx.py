"""FX adapter: a ``torch.export`` program seen through :class:`~rewrite.graph.base.GraphView`.

The adapter works on ``ep.module()`` (the unlifted ``GraphModule``: user inputs are placeholders, parameters and
buffers are ``get_attr`` nodes), which is also the graph the FX emitter edits before re-exporting. Values are
``torch.fx.Node`` objects; multi-output ops are read through ``operator.getitem``.
"""
from __future__ import annotations

import logging
import operator
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx

from .base import Canon, Dim, normalize_axis

log = logging.getLogger(__name__)
aten = torch.ops.aten


def _rank(node: Any) -> int | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def _transpose(n: fx.Node) -> Canon | None:
    r = _rank(n.args[0])
    if r is None:
        return None
    a, b = normalize_axis(int(n.args[1]), r), normalize_axis(int(n.args[2]), r)
    perm = list(range(r))
    perm[a], perm[b] = perm[b], perm[a]
    return Canon("transpose", (n.args[0],), {"perm": tuple(perm)})


def _permute(n: fx.Node) -> Canon:
    r = len(n.args[1])
    return Canon("transpose", (n.args[0],), {"perm": tuple(normalize_axis(int(p), r) for p in n.args[1])})


def _softmax(n: fx.Node, log_: bool = False) -> Canon:
    return Canon("softmax", (n.args[0],), {"axis": normalize_axis(int(n.args[1]), _rank(n.args[0])), "log": log_})


def _dropout(n: fx.Node) -> Canon:
    p = float(n.args[1]) if len(n.args) > 1 else 0.5
    train = bool(n.args[2]) if len(n.args) > 2 else True
    return Canon("dropout", (n.args[0],), {"p": p, "train": train})


def _sdpa(n: fx.Node) -> Canon:
    a, kw = n.args, n.kwargs
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    vals = {k: (a[i] if i < len(a) else kw.get(k)) for i, k in enumerate(names)}
    is_flash_cpu = n.target is aten._scaled_dot_product_flash_attention_for_cpu.default
    if is_flash_cpu:  # (q, k, v, dropout_p, is_causal, *, attn_mask, scale)
        vals = {"query": a[0], "key": a[1], "value": a[2], "dropout_p": a[3] if len(a) > 3 else kw.get("dropout_p", 0.0),
                "is_causal": a[4] if len(a) > 4 else kw.get("is_causal", False), "attn_mask": kw.get("attn_mask")}
    return Canon("sdpa", (vals["query"], vals["key"], vals["value"], vals["attn_mask"]),
                 {"scale": kw.get("scale"), "causal": bool(vals["is_causal"] or False),
                  "dropout": float(vals["dropout_p"] or 0.0), "gqa": bool(kw.get("enable_gqa", False)),
                  "returns_tuple": is_flash_cpu})


def _unary(kind: str, **attrs: Any) -> Callable[[fx.Node], Canon]:
    return lambda n: Canon(kind, (n.args[0],), dict(attrs))


def _binary(kind: str) -> Callable[[fx.Node], Canon]:
    return lambda n: Canon(kind, (n.args[0], n.args[1]), {"alpha": n.kwargs.get("alpha", 1)})


def _compare(op: str) -> Callable[[fx.Node], Canon]:
    return lambda n: Canon("compare", (n.args[0], n.args[1]), {"op": op})


def _cast(n: fx.Node) -> Canon:
    dtype = n.kwargs.get("dtype")
    if dtype is None and len(n.args) > 1 and isinstance(n.args[1], torch.dtype):
        dtype = n.args[1]
    return Canon("cast" if dtype is not None else "identity", (n.args[0],),
                 {"dtype": str(dtype).replace("torch.", "") if dtype is not None else None, "why": "copy"})


_TABLE: dict[Any, Callable[[fx.Node], Canon | None]] = {
    aten.matmul.default: _binary("matmul"),
    aten.bmm.default: _binary("matmul"),
    aten.baddbmm.default: lambda n: Canon("matmul", (n.args[1], n.args[2], n.args[0]),
                                          {"beta": n.kwargs.get("beta", 1), "alpha": n.kwargs.get("alpha", 1)}),
    aten.linear.default: lambda n: Canon("linear", tuple(n.args[:3]) if len(n.args) > 2 else (n.args[0], n.args[1], None),
                                         {"weight_layout": "out_in"}),
    aten.addmm.default: lambda n: Canon("linear", (n.args[1], n.args[2], n.args[0]), {"weight_layout": "in_out"}),
    aten.softmax.int: _softmax,
    aten._softmax.default: _softmax,
    aten._safe_softmax.default: _softmax,
    aten.log_softmax.int: lambda n: _softmax(n, True),
    aten._log_softmax.default: lambda n: _softmax(n, True),
    aten.mul.Tensor: _binary("mul"),
    aten.mul.Scalar: _binary("mul"),
    aten.div.Tensor: _binary("div"),
    aten.div.Scalar: _binary("div"),
    aten.add.Tensor: _binary("add"),
    aten.add.Scalar: _binary("add"),
    aten.sub.Tensor: _binary("sub"),
    aten.rsub.Scalar: lambda n: Canon("rsub", (n.args[0], n.args[1]), {}),
    aten.where.self: lambda n: Canon("where", tuple(n.args[:3]), {}),
    aten.where.ScalarOther: lambda n: Canon("where", tuple(n.args[:3]), {}),
    aten.where.ScalarSelf: lambda n: Canon("where", tuple(n.args[:3]), {}),
    aten.where.Scalar: lambda n: Canon("where", tuple(n.args[:3]), {}),
    aten.slice.Tensor: _unary("slice"),
    aten.masked_fill.Scalar: lambda n: Canon("masked_fill", tuple(n.args[:3]), {}),
    aten.masked_fill.Tensor: lambda n: Canon("masked_fill", tuple(n.args[:3]), {}),
    aten.masked_fill_.Scalar: lambda n: Canon("masked_fill", tuple(n.args[:3]), {}),
    aten.transpose.int: _transpose,
    aten.permute.default: _permute,
    aten.t.default: lambda n: Canon("transpose", (n.args[0],), {"perm": (1, 0)}),
    aten.view.default: _unary("reshape"),
    aten.reshape.default: _unary("reshape"),
    aten._unsafe_view.default: _unary("reshape"),
    aten.unflatten.int: _unary("reshape"),
    aten.flatten.using_ints: _unary("reshape"),
    aten.select.int: lambda n: Canon("select", (n.args[0],), {"axis": normalize_axis(int(n.args[1]), _rank(n.args[0])),
                                                               "index": n.args[2]}),
    aten._to_copy.default: _cast,
    aten.to.dtype: _cast,
    aten.to.dtype_layout: _cast,
    aten.type_as.default: lambda n: Canon("cast", (n.args[0],), {"dtype": None}),
    aten.dropout.default: _dropout,
    aten.native_dropout.default: _dropout,
    aten.clone.default: _unary("identity", why="clone"),
    aten.contiguous.default: _unary("identity", why="contiguous"),
    aten.alias.default: _unary("identity", why="alias"),
    aten.detach.default: _unary("identity", why="detach"),
    aten.lift_fresh_copy.default: _unary("identity", why="lift"),
    aten.expand.default: _unary("expand"),
    aten.repeat_interleave.self_int: _unary("expand"),
    aten.unsqueeze.default: _unary("unsqueeze"),
    aten.isnan.default: _unary("isnan"),
    aten.full_like.default: lambda n: Canon("full_like", (n.args[0],), {"value": n.args[1]}),
    aten.zeros_like.default: lambda n: Canon("full_like", (n.args[0],), {"value": 0}),
    aten.any.dim: lambda n: Canon("any", (n.args[0],), {"axis": normalize_axis(int(n.args[1]), _rank(n.args[0])),
                                                         "keepdim": bool(n.args[2]) if len(n.args) > 2 else False}),
    aten.logical_not.default: _unary("not"),
    aten.bitwise_not.default: _unary("not"),
    aten.sqrt.default: _unary("sqrt"),
    aten.reciprocal.default: _unary("reciprocal"),
    aten.eq.Tensor: _compare("eq"), aten.eq.Scalar: _compare("eq"),
    aten.ne.Tensor: _compare("ne"), aten.ne.Scalar: _compare("ne"),
    aten.lt.Tensor: _compare("lt"), aten.le.Tensor: _compare("le"),
    aten.gt.Tensor: _compare("gt"), aten.ge.Tensor: _compare("ge"),
    aten.lt.Scalar: _compare("lt"), aten.le.Scalar: _compare("le"),
    aten.gt.Scalar: _compare("gt"), aten.ge.Scalar: _compare("ge"),
    aten.triu.default: _unary("trilu", upper=True),
    aten.tril.default: _unary("trilu", upper=False),
    aten.arange.default: lambda n: Canon("arange", (), {}),
    aten.arange.start: lambda n: Canon("arange", (), {}),
    aten.arange.start_step: lambda n: Canon("arange", (), {}),
    aten.scaled_dot_product_attention.default: _sdpa,
    aten._scaled_dot_product_flash_attention_for_cpu.default: _sdpa,
    aten._native_multi_head_attention.default: lambda n: Canon(
        "mha_native", tuple(n.args[:3]) + tuple(n.args[5:9]),
        {"heads": int(n.args[4]), "embed": int(n.args[3]),
         "mask": n.args[9] if len(n.args) > 9 else n.kwargs.get("mask"),
         "need_weights": bool(n.args[10] if len(n.args) > 10 else n.kwargs.get("need_weights", True)),
         "mask_type": n.args[12] if len(n.args) > 12 else n.kwargs.get("mask_type")}),
}



def _torchvision_nms() -> Any | None:
    """``torch.ops.torchvision.nms.default`` when torchvision is importable (it registers the op), else None."""
    try:
        import torchvision  # noqa: F401
        return torch.ops.torchvision.nms.default
    except (ImportError, AttributeError, RuntimeError, OSError):  # absent, or built for another torch
        return None


def _nms(n: fx.Node) -> Canon:
    """``torchvision::nms(boxes, scores, iou_threshold)`` in the NMS vocabulary (no cap, no score threshold)."""
    return Canon("nms", (n.args[0], n.args[1], None, n.args[2], None), {"box_layout": "xyxy"})


if _torchvision_nms() is not None:  # guarded spelling: torchvision is not installable beside every torch
    _TABLE[_torchvision_nms()] = _nms

class FxGraph:
    """:class:`GraphView` over an unlifted ``torch.fx.GraphModule`` from ``ExportedProgram.module()``."""

    kind = "fx"

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.graph = gm.graph
        self._canon: dict[fx.Node, Canon | None] = {}
        self._output_values: set[fx.Node] = set()
        self._live: set[fx.Node] = set()
        for node in reversed(self.graph.nodes):  # liveness: what reaches an output
            if node.op == "output":
                self._live.add(node)
                for v in torch.utils._pytree.tree_leaves(node.args[0]):
                    if isinstance(v, fx.Node):
                        self._output_values.add(v)
            if node in self._live:
                self._live.update(node.all_input_nodes)
        for node in self.graph.nodes:
            if node.op == "call_function":
                fn = _TABLE.get(node.target)
                try:
                    self._canon[node] = fn(node) if fn is not None else None
                except (IndexError, TypeError, ValueError):  # unusual argument spelling: no canonical form
                    self._canon[node] = None

    # -- structure -------------------------------------------------------------------------------------------
    def nodes(self) -> Iterator[fx.Node]:
        return (n for n in self.graph.nodes if n.op == "call_function")

    def canon(self, node: fx.Node) -> Canon | None:
        if node is None:
            return None
        if node.op == "call_function" and node.target is operator.getitem:
            src = node.args[0]
            if isinstance(src, fx.Node) and src.target is aten.unbind.int:
                axis = normalize_axis(int(src.args[1]) if len(src.args) > 1 else 0, _rank(src.args[0]))
                return Canon("select", (src.args[0],), {"axis": axis, "index": node.args[1]})
            if isinstance(src, fx.Node) and node.args[1] == 0 and self._canon.get(src) is not None \
                    and self._canon[src].kind in ("sdpa", "dropout"):
                return Canon("identity", (src,), {"why": "getitem0"})
            return None
        return self._canon.get(node)

    def op_name(self, node: fx.Node) -> str:
        if node.op == "call_function":
            return getattr(node.target, "__name__", str(node.target)) if node.target is operator.getitem \
                else str(node.target)
        return node.op

    def node_name(self, node: fx.Node) -> str:
        return node.name

    def outputs(self, node: fx.Node) -> Sequence[fx.Node]:
        return (node,)

    def producer(self, value: Any) -> fx.Node | None:
        if isinstance(value, fx.Node) and value.op == "call_function":
            return value
        return None

    def raw_inputs(self, node: fx.Node) -> list[Any]:
        return list(node.all_input_nodes)

    def users(self, value: fx.Node) -> list[fx.Node]:
        """Users that contribute to a graph output (assertions and dead code are not users)."""
        return [u for u in value.users if u.op != "output" and u in self._live]

    def is_graph_output(self, value: Any) -> bool:
        return value in self._output_values

    def is_graph_input(self, value: Any) -> bool:
        return isinstance(value, fx.Node) and value.op == "placeholder"

    def is_constant(self, value: Any) -> bool:
        return isinstance(value, (int, float)) or (isinstance(value, fx.Node) and value.op == "get_attr")

    # -- constants ---------------------------------------------------------------------------------------------
    def _attr(self, node: fx.Node) -> Any:
        obj: Any = self.gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return obj

    def const_array(self, value: Any, max_elements: int = 1 << 20) -> Any | None:
        if isinstance(value, (int, float)):
            return torch.tensor(value).numpy()
        if isinstance(value, fx.Node) and value.op == "get_attr":
            t = self._attr(value)
            if isinstance(t, torch.Tensor) and t.numel() <= max_elements:
                return t.detach().float().numpy() if t.dtype in (torch.bfloat16,) else t.detach().numpy()
        return None

    def scalar(self, value: Any, depth: int = 0) -> float | None:
        """The value of a scalar constant (Python number, 1-element constant, or arithmetic on those)."""
        if isinstance(value, bool):
            return None
        if isinstance(value, (int, float)):
            return float(value)
        if not isinstance(value, fx.Node) or depth > 8:
            return None
        if value.op == "get_attr":
            arr = self.const_array(value, 1)
            return float(arr.reshape(-1)[0]) if arr is not None and arr.size == 1 else None
        if value.op != "call_function":
            return None
        t = value.target
        if t in (aten.scalar_tensor.default, aten.full.default) and (t is aten.scalar_tensor.default or
                                                                     list(value.args[0]) in ([], [1])):
            return float(value.args[0] if t is aten.scalar_tensor.default else value.args[1])
        if t in (aten.zeros.default, aten.ones.default) and list(value.args[0]) in ([], [1]):
            return 0.0 if t is aten.zeros.default else 1.0
        canon = self.canon(value)
        if canon is None:
            return None
        if canon.kind in ("identity", "cast"):
            return self.scalar(canon.inputs[0], depth + 1)
        if canon.kind in ("sqrt", "reciprocal"):
            x = self.scalar(canon.inputs[0], depth + 1)
            if x is None or x <= 0:
                return None
            return x ** 0.5 if canon.kind == "sqrt" else 1.0 / x
        if canon.kind in ("mul", "div", "add", "sub"):
            a, b = (self.scalar(v, depth + 1) for v in canon.inputs[:2])
            if a is None or b is None:
                return None
            return {"mul": a * b, "div": a / b if b else None, "add": a + b, "sub": a - b}[canon.kind]
        return None

    # -- types -------------------------------------------------------------------------------------------------
    def shape(self, value: Any) -> tuple[Dim, ...] | None:
        val = value.meta.get("val") if isinstance(value, fx.Node) else None
        if not isinstance(val, torch.Tensor):
            return None
        return tuple(int(d) if isinstance(d, int) or (hasattr(d, "node") and d.node.is_constant()) else str(d)
                     for d in val.shape)

    def dtype(self, value: Any) -> str | None:
        val = value.meta.get("val") if isinstance(value, fx.Node) else None
        if isinstance(val, torch.Tensor):
            return str(val.dtype).replace("torch.", "")
        return None

    def value_name(self, value: Any) -> str:
        return value.name if isinstance(value, fx.Node) else repr(value)

    def key(self, value: Any) -> Any:
        return value

"""BiViT on ONNX input: the recognition rule of :mod:`.locate` read on an ONNX graph, and the deploy form written
directly as ONNX nodes (no QAT on ONNX: QAT trains FX programs).

A Linear in ONNX is ``MatMul(x, W)`` with W a constant of shape (in, out), optionally followed by ``Add`` of a
constant bias (the dynamo exporter's spelling); ``Gemm`` is refused with a reason. Walks go through layout-only
ops (Reshape, Transpose, Identity, Squeeze, Unsqueeze, Flatten, Dropout). The MLP activation is the region of
elementwise ops (an exported GELU is Div, Erf, Add, Mul, Mul) between fc1 and the one constant-weight MatMul it
reaches (fc2). The binary weights and α come from the same modules the FX path uses
(:class:`~.modules.BinaryLinear` then ``freeze()``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import onnx_ir as ir
import torch

from rewrite.sites import AttentionSite, NoMatch, Reason

from .locate import BlockLinears, MAX_STEPS
from .modules import BinaryLinear

LAYOUT = {"Reshape", "Transpose", "Identity", "Squeeze", "Unsqueeze", "Flatten", "Dropout"}
ELEMENTWISE = {"Div", "Erf", "Add", "Mul", "Sub", "Tanh", "Sigmoid", "Relu", "Gelu", "Pow", "Sqrt", "Neg", "Exp",
               "Softplus", "HardSigmoid", "HardSwish", "Mish", "Elu", "LeakyRelu", "Cast", "Where", "Max", "Min"}
NORMS = {"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization"}


def _const(value: Any) -> Optional[np.ndarray]:
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return producer.attributes["value"].as_tensor().numpy()
    return None


@dataclass(eq=False)
class OnnxLinear:
    """``MatMul(x, W)`` (+ ``Add(·, b)``): the MatMul node, its input, W (in, out)."""

    matmul: ir.Node
    weight: np.ndarray

    @property
    def name(self) -> str:
        return self.matmul.name or self.matmul.outputs[0].name

    @property
    def input(self) -> ir.Value:
        return self.matmul.inputs[0]


def _matmul_linear(node: Optional[ir.Node]) -> Optional[OnnxLinear]:
    if node is None or node.op_type != "MatMul":
        return None
    w = _const(node.inputs[1])
    if w is None or w.ndim != 2 or _const(node.inputs[0]) is not None:
        return None
    return OnnxLinear(node, w)


def _linear_ending_at(node: ir.Node) -> Optional[OnnxLinear]:
    """The Linear whose last op is ``node`` (MatMul, or Add of a constant bias to a MatMul)."""
    if node.op_type == "MatMul":
        return _matmul_linear(node)
    if node.op_type == "Add":
        for i in (0, 1):
            if _const(node.inputs[1 - i]) is not None:
                lin = _matmul_linear(node.inputs[i].producer())
                if lin is not None and len(node.inputs[i].uses()) == 1:
                    return lin
    return None


def _consumers(value: ir.Value) -> list[ir.Node]:
    return [use.node for use in value.uses()]


def _out_of(lin: OnnxLinear) -> ir.Value:
    """The Linear's output value (after its bias Add when there is one)."""
    out = lin.matmul.outputs[0]
    users = _consumers(out)
    if len(users) == 1 and users[0].op_type == "Add" and any(_const(v) is not None for v in users[0].inputs):
        return users[0].outputs[0]
    return out


def _up(value: ir.Value, role: str) -> OnnxLinear:
    current = value
    for _ in range(MAX_STEPS):
        node = current.producer()
        if node is None:
            break
        lin = _linear_ending_at(node)
        if lin is not None:
            return lin
        if node.op_type not in LAYOUT:
            raise NoMatch(Reason(node.name or "?", node.op_type, f"layout-only ops up to the {role} projection "
                                 "MatMul with a constant weight", node.op_type))
        current = node.inputs[0]
    raise NoMatch(Reason(value.name or "?", "value", f"the {role} projection within {MAX_STEPS} ops", "none"))


def _down_to_linear(value: ir.Value, role: str) -> OnnxLinear:
    current = value
    for _ in range(MAX_STEPS):
        users = _consumers(current)
        if len(users) != 1:
            raise NoMatch(Reason(current.name or "?", "value", f"a single use on the way to the {role} Linear",
                                 f"{len(users)} uses"))
        node = users[0]
        lin = _matmul_linear(node)
        if lin is not None and node.inputs[0] is current:
            return lin
        if node.op_type not in LAYOUT or node.inputs[0] is not current:
            raise NoMatch(Reason(node.name or "?", node.op_type, f"layout-only ops down to the {role} Linear",
                                 node.op_type))
        current = node.outputs[0]
    raise NoMatch(Reason(value.name or "?", "value", f"the {role} Linear within {MAX_STEPS} ops", "a longer chain"))


def _mlp(o_proj: OnnxLinear) -> dict[str, OnnxLinear]:
    out = _out_of(o_proj)
    users = _consumers(out)
    if len(users) != 1 or users[0].op_type != "Add":
        raise NoMatch(Reason(out.name or "?", "value", "the residual Add after the output projection",
                             ", ".join(u.op_type for u in users) or "no use"))
    residual = users[0].outputs[0]
    norms = [u for u in _consumers(residual) if u.op_type in NORMS]
    if len(norms) != 1:
        raise NoMatch(Reason(residual.name or "?", "Add", "exactly one LayerNormalization reading the residual",
                             f"{len(norms)}"))
    fc1 = _down_to_linear(norms[0].outputs[0], "MLP fc1")
    # the activation: elementwise ops from fc1's output up to exactly one constant-weight MatMul (fc2)
    start = _out_of(fc1)
    seen, frontier, ends = set(), [start], []
    while frontier:
        value = frontier.pop()
        for node in _consumers(value):
            if id(node) in seen:
                continue
            seen.add(id(node))
            lin = _matmul_linear(node)
            if lin is not None:
                ends.append(lin)
            elif node.op_type in ELEMENTWISE and len(seen) < 64:
                frontier.extend(node.outputs)
            else:
                raise NoMatch(Reason(node.name or "?", node.op_type, "elementwise activation ops between fc1 and fc2",
                                     node.op_type))
    if len(ends) != 1 or ends[0].matmul.inputs[0] is start:
        raise NoMatch(Reason(start.name or "?", "value", "one activation, then one MLP fc2 MatMul",
                             f"{len(ends)} MatMul(s)" if len(ends) != 1 else "no activation"))
    return {"fc1": fc1, "fc2": ends[0]}


def block_linears_onnx(site: AttentionSite) -> BlockLinears:
    """:func:`.locate.block_linears` on an ONNX graph (values are ``onnx_ir.Value``)."""
    block = BlockLinears(site)
    try:
        found = {r: _up(v, r) for r, v in (("q", site.q), ("k", site.k), ("v", site.v))}
        if len({id(f.matmul) for f in found.values()}) != 3:
            raise NoMatch(Reason(found["q"].name, "MatMul", "three distinct q/k/v projections", "a shared one"))
        if len({id(f.input) for f in found.values()}) != 1:
            raise NoMatch(Reason(found["k"].name, "MatMul", "q/k/v projections reading the same hidden states",
                                 "different inputs"))
        found["o"] = _down_to_linear(site.output, "output")
        block.attention = found
    except NoMatch as exc:
        block.attention_reason = exc.reason
        return block
    try:
        block.mlp = _mlp(block.attention["o"])
    except NoMatch as exc:
        block.mlp_reason = exc.reason
    return block


class OnnxEmitter:
    """Writes deploy-form nodes into ``model`` (initializers named ``bivit/<site>/<role>/...``)."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.graph = model.graph
        self._signs: dict[int, ir.Value] = {}
        self._scalars: dict[tuple[str, float], ir.Value] = {}

    def _init(self, name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array)))
        self.graph.register_initializer(value)
        return value

    def _scalar(self, value: float, dtype: Any = np.float32) -> ir.Value:
        key = (np.dtype(dtype).name, float(value))
        if key not in self._scalars:
            self._scalars[key] = self._init(f"bivit/const_{len(self._scalars)}", np.array(value, dtype=dtype))
        return self._scalars[key]

    def _insert(self, anchor: ir.Node, nodes: list[ir.Node]) -> None:
        self.graph.insert_before(anchor, nodes)

    def sign(self, x: ir.Value, anchor: ir.Node) -> ir.Value:
        """``Where(GreaterOrEqual(x, 0), 1, -1)``, one per value."""
        if id(x) not in self._signs:
            ge = ir.node("GreaterOrEqual", [x, self._scalar(0.0)])
            where = ir.node("Where", [ge.outputs[0], self._scalar(1.0), self._scalar(-1.0)])
            self._insert(anchor, [ge, where])
            self._signs[id(x)] = where.outputs[0]
        return self._signs[id(x)]

    def linear(self, lin: OnnxLinear, name: str, binarize_input: bool) -> tuple[int, int]:
        """Replace ``lin``'s MatMul by ``MatMul(sign(x) or x, W±1) * α``; returns (out, in)."""
        frozen = BinaryLinear(torch.from_numpy(lin.weight.T.astype(np.float32)), None, binarize_input).freeze()
        signs_t = frozen.signs.numpy().T.copy()  # (in, out)
        alpha = frozen.alpha.numpy()
        x = self.sign(lin.input, lin.matmul) if binarize_input else lin.input
        mm = ir.node("MatMul", [x, self._init(f"bivit/{name}/signs", signs_t)])
        mul = ir.node("Mul", [mm.outputs[0], self._init(f"bivit/{name}/alpha", alpha)])
        self._insert(lin.matmul, [mm, mul])
        old = lin.matmul.outputs[0]
        new = mul.outputs[0]
        new.type, new.shape = old.type, old.shape
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        return signs_t.shape[1], signs_t.shape[0]

    def core(self, site: AttentionSite, ratio: float) -> None:
        """Replace the site's output by SAB(softmax(scale · sign(Q) sign(K)ᵀ)) · sign(V)."""
        anchor = site.output.producer()
        q, k, v = (self.sign(val, anchor) for val in (site.q, site.k, site.v))
        nodes = []
        if not site.k_transposed:
            rank = len(site.k.shape) if site.k.shape is not None else 4
            perm = list(range(rank - 2)) + [rank - 1, rank - 2]
            t = ir.node("Transpose", [k], {"perm": perm})
            nodes.append(t)
            k = t.outputs[0]
        scores = ir.node("MatMul", [q, k])
        scaled = ir.node("Mul", [scores.outputs[0], self._scalar(site.scale)])
        p = ir.node("Softmax", [scaled.outputs[0]], {"axis": -1})
        axes = self._init(f"bivit/{site.name}/axes", np.array([-1], dtype=np.int64))
        amax = ir.node("ReduceMax", [p.outputs[0], axes], {"keepdims": 1})
        thr = ir.node("Mul", [amax.outputs[0], self._scalar(ratio)])
        ge = ir.node("GreaterOrEqual", [p.outputs[0], thr.outputs[0]])
        b = ir.node("Cast", [ge.outputs[0]], {"to": ir.DataType.FLOAT})
        out = ir.node("MatMul", [b.outputs[0], v])
        nodes += [scores, scaled, p, amax, thr, ge, b, out]
        self._insert(anchor, nodes)
        new, old = out.outputs[0], site.output
        new.type, new.shape = old.type, old.shape
        old.replace_all_uses_with(new, replace_graph_outputs=True)

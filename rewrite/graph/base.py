"""The graph protocol both graph kinds implement, and the canonical op record.

A *value* is whatever the adapter uses for an SSA value (an ``fx.Node`` for FX, an ``onnx_ir.Value`` for ONNX);
a *node* is the adapter's node. Recognizers only use the methods below and the :class:`Canon` records, so they
run unchanged on both graph kinds (DESIGN.md: one recognizer, two graph kinds).

Canonical op kinds (the vocabulary; ``Canon.kind``):

=============== ============================================= ========================================
kind            inputs                                        attrs
=============== ============================================= ========================================
matmul          a, b [, bias]                                  alpha, beta (baddbmm), trans_b (Gemm)
linear          x, weight [, bias]                             weight_layout "out_in" | "in_out"
softmax         x                                              axis (non-negative), log (bool)
mul, div        a, b                                           -
add, sub        a, b                                           alpha
where           cond, a, b                                     -
masked_fill     x, cond, value                                 -
cast            x                                              dtype (str)
transpose       x                                              perm (full permutation, tuple)
reshape         x                                              -
select          x                                              axis, index
identity        x                                              why ("dropout", "clone", ...)
dropout         x                                              p, train
expand          x                                              -
unsqueeze       x                                              -
isnan, not      x                                              -
full_like       x                                              value (zeros_like: 0)
any             x                                              axis, keepdim
compare         a, b                                           op
trilu           x                                              upper
arange          -                                              -
sqrt, reciprocal x                                             -
sdpa            q, k, v [, mask]                               scale, causal, dropout, gqa
mha_native      query, key, value, in_w, in_b, out_w, out_b    heads, mask_type, need_weights
ort_attention   (com.microsoft Attention inputs)               node attributes
ort_mha         (com.microsoft MultiHeadAttention inputs)      node attributes
onnx_attention  (ai.onnx opset-23 Attention inputs)            node attributes
nms             boxes, scores, max_out, iou_thr, score_thr    center_point_box (ONNX) | box_layout (FX)
=============== ============================================= ========================================

``inputs`` holds values (or ``None`` for an absent optional input); Python scalars in FX arguments are kept as
numbers so :meth:`GraphView.scalar` can read them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable, Iterator, Protocol, Sequence


@dataclass(frozen=True)
class Canon:
    """A node seen through the canonical vocabulary: its kind, its inputs (values) and normalized attributes."""

    kind: str
    inputs: tuple[Any, ...]
    attrs: dict[str, Any] = field(default_factory=dict)


Dim = int | str | None  # static size, symbolic name, or unknown


class GraphView(Protocol):
    """What recognizers may ask of a graph. Implementations: :class:`rewrite.graph.fx.FxGraph`,
    :class:`rewrite.graph.onnx_graph.OnnxGraph`.

    Contract: iteration order is topological; ``canon`` is cached (index built once, O(#nodes)).
    """

    kind: str  # "fx" or "onnx"

    def nodes(self) -> Iterator[Any]: ...

    def canon(self, node: Any) -> Canon | None: ...

    def op_name(self, node: Any) -> str: ...

    def node_name(self, node: Any) -> str: ...

    def outputs(self, node: Any) -> Sequence[Any]: ...

    def producer(self, value: Any) -> Any | None: ...

    def users(self, value: Any) -> list[Any]: ...

    def is_graph_output(self, value: Any) -> bool: ...

    def is_graph_input(self, value: Any) -> bool: ...

    def is_constant(self, value: Any) -> bool: ...

    def scalar(self, value: Any) -> float | None: ...

    def const_array(self, value: Any, max_elements: int = 1 << 20) -> Any | None: ...

    def shape(self, value: Any) -> tuple[Dim, ...] | None: ...

    def dtype(self, value: Any) -> str | None: ...

    def value_name(self, value: Any) -> str: ...

    def key(self, value: Any) -> Hashable: ...


def normalize_axis(axis: int, rank_: int | None) -> int:
    """A non-negative axis (``axis`` may be negative); returns ``axis`` unchanged if the rank is unknown."""
    if axis < 0 and rank_ is not None:
        return axis + rank_
    return axis


def walk_ancestors(graph: GraphView, values: Iterable[Any], limit: int = 400) -> Iterator[Any]:
    """Nodes producing ``values`` and their ancestors, breadth first, each once, at most ``limit`` nodes."""
    seen: set = set()
    frontier = [v for v in values if v is not None]
    count = 0
    while frontier and count < limit:
        value = frontier.pop()
        node = graph.producer(value)
        if node is None:
            continue
        nid = id(node)
        if nid in seen:
            continue
        seen.add(nid)
        count += 1
        yield node
        canon = graph.canon(node)
        inputs = canon.inputs if canon is not None else graph.raw_inputs(node)  # type: ignore[attr-defined]
        for v in inputs:
            if v is not None and not isinstance(v, (int, float, bool, str, list, tuple)):
                frontier.append(v)

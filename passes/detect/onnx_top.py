"""Soft-NMS on the K highest-scoring boxes of every group, with a run-time proof that the rest could not matter and
the full graph as the fallback (for many boxes and few picks: 1000 boxes, 100 picks).

Per group (one class of one image), the window is the K boxes with the largest input scores (``TopK``; NaN scores
count as −∞), kept in index order so that ties between decayed scores still go to the lowest index, and b is the
largest input score outside the window (−∞ if none). Soft-NMS runs on the windows (each group its own image of K
boxes; the one-pick graph of :mod:`passes.detect.onnx_nms`). Its result is the full result when, for every group,
b < ``min_score`` (no live box outside), or the window made ``max_output_boxes_per_class`` picks and the last (the
lowest: selected scores never increase) is > b. Why: a box outside the window has a current score ≤ its input
score ≤ b (factors are in [0, 1]) below every pick, so in the sequential loop it is never the pick before the cap is
reached, and a box that is never picked changes no other box's score; the window's picks are therefore the same
boxes in the same order with the same float64 products. Otherwise (an ``If``) the full graph runs.

The window graph is built for finite coordinates (:class:`passes.detect.onnx_nms.GraphForm` ``finite``: an IoU
without its union guard, exact for |c| ≤ :data:`passes.detect.onnx_nms.FINITE_BOUND`), so the condition also
requires every window coordinate within that bound (NaN fails it); Gaussian windows take the weight matrix for a
single group and IoU rows for more (an ``If`` on B·C; the matrix holds exponents, ``Exp`` per picked row).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper


def _rename_inputs(graph: onnx.GraphProto, names: dict[str, str]) -> None:
    """Rename the values ``graph``'s nodes (and their sub-graphs) read, in place."""
    for node in graph.node:
        node.input[:] = [names.get(i, i) for i in node.input]
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _rename_inputs(attr.g, names)


def top_window_graph(window_graph: onnx.GraphProto, full_graph: onnx.GraphProto, top: int, prefix: str = ""
                     ) -> onnx.GraphProto:
    """``full_graph`` behind an ``If`` whose other branch runs ``window_graph`` (the same method, built with its own
    value prefix) on the ``top`` highest-scoring boxes of every group (module docstring)."""
    from .onnx_nms import FINITE_BOUND, INPUT_NAMES, OUTPUT_NAMES, _Builder
    b = _Builder(f"{prefix}top/")
    boxes, scores, max_in, _, score_in = INPUT_NAMES
    i64 = lambda v: b.const(v, np.int64)  # noqa: E731
    shape = b.op("Shape", [scores])                                                         # [B, C, N]
    n, n_classes = b.op("Slice", [shape, i64([2]), i64([3])]), b.op("Slice", [shape, i64([1]), i64([2])])
    k = b.op("Min", [n, i64([top])])
    s = b.op("Cast", [scores], to=TensorProto.DOUBLE)
    s = b.op("Where", [b.op("IsNaN", [s]), b.const(-np.inf, np.float64), s])
    values, order = b.op("TopK", [s, b.op("Min", [n, i64([top + 1])])], n_out=2, axis=2, largest=1, sorted=1)
    outside = b.op("Concat", [b.op("Slice", [values, k, b.op("Add", [k, i64([1])]), i64([2])]),
                              b.op("Expand", [b.const(-np.inf, np.float64), b.op("Concat", [
                                  b.op("Slice", [shape, i64([0]), i64([2])]), i64([1])], axis=0)])], axis=2)
    bound = b.op("ReduceMax", [outside, i64([2])], keepdims=0)                                # (B, C)
    picked = b.op("Slice", [order, i64([0]), k, i64([2])])                                    # (B, C, K)
    index = b.op("TopK", [picked, k], n_out=2, axis=2, largest=0, sorted=1)[0]                # index order
    groups = b.op("Mul", [b.op("Slice", [shape, i64([0]), i64([1])]), n_classes])
    win_boxes = b.op("Reshape", [b.op("GatherND", [boxes, b.op("Unsqueeze", [index, i64([3])])], batch_dims=1),
                                 b.op("Concat", [groups, k, i64([4])], axis=0)], allowzero=1)  # (G, K, 4)
    win_scores = b.op("Reshape", [b.op("GatherElements", [scores, index], axis=2),
                                  b.op("Concat", [groups, i64([1]), k], axis=0)], allowzero=1)  # (G, 1, K)
    inner = onnx.GraphProto()
    inner.CopyFrom(window_graph)
    renamed = {o: f"{prefix}top/window/{o}" for o in OUTPUT_NAMES}
    for node in inner.node:
        node.output[:] = [renamed.get(o, o) for o in node.output]
    _rename_inputs(inner, {boxes: win_boxes, scores: win_scores})
    b.nodes.extend(inner.node)
    rows, kept = renamed[OUTPUT_NAMES[0]], renamed[OUTPUT_NAMES[1]]                          # (M, 3): (g, 0, k)
    g = b.op("Squeeze", [b.op("Slice", [rows, i64([0]), i64([1]), i64([1])]), i64([1])])      # (M,)
    slot = b.op("Squeeze", [b.op("Slice", [rows, i64([2]), i64([3]), i64([1])]), i64([1])])
    divisor = b.op("Max", [n_classes, i64([1])])
    flat_index = b.op("Reshape", [index, b.op("Concat", [groups, k], axis=0)], allowzero=1)   # (G, K)
    box = b.op("GatherND", [flat_index, b.op("Concat", [b.op("Unsqueeze", [g, i64([1])]),
                                                         b.op("Unsqueeze", [slot, i64([1])])], axis=1)])
    mapped = b.op("Concat", [b.op("Unsqueeze", [b.op("Div", [g, divisor]), i64([1])]),
                             b.op("Unsqueeze", [b.op("Mod", [g, divisor]), i64([1])]),
                             b.op("Unsqueeze", [box, i64([1])])], axis=1)
    # per group: picks made and the lowest picked score (selected scores never increase)
    zeros = b.op("ConstantOfShape", [groups], value=helper.make_tensor("z", TensorProto.DOUBLE, [1], [0.0]))
    count = b.op("ScatterElements", [zeros, g, b.op("Expand", [b.const(1.0, np.float64), b.op("Shape", [g])])],
                 axis=0, reduction="add")
    lowest = b.op("ScatterElements", [b.op("Add", [zeros, b.const(np.inf, np.float64)]), g,
                                      b.op("Cast", [kept], to=TensorProto.DOUBLE)], axis=0, reduction="min")
    bound_flat = b.op("Reshape", [bound, groups], allowzero=1)
    cap = b.op("Cast", [max_in], to=TensorProto.DOUBLE)
    live_outside = b.op("GreaterOrEqual", [bound_flat, b.op("Cast", [score_in], to=TensorProto.DOUBLE)])
    settled = b.op("And", [b.op("Equal", [count, cap]), b.op("Greater", [lowest, bound_flat])])
    bad = b.op("Cast", [b.op("And", [live_outside, b.op("Not", [settled])])], to=TensorProto.FLOAT)
    # the window graph is built for finite coordinates with |c| <= FINITE_BOUND (an unguarded IoU; NaN fails too)
    wild = b.op("ReduceSum", [b.op("Cast", [b.op("Not", [b.op("LessOrEqual", [
        b.op("Abs", [b.op("Cast", [win_boxes], to=TensorProto.DOUBLE)]), b.const(FINITE_BOUND, np.float64)])])],
        to=TensorProto.FLOAT)], keepdims=0)
    ok = b.op("Equal", [b.op("Add", [b.op("ReduceSum", [bad], keepdims=0), wild]), b.const(0.0, np.float32)])
    then_graph = helper.make_graph(
        [helper.make_node("Identity", [mapped], [f"{prefix}top/then/indices"]),
         helper.make_node("Identity", [kept], [f"{prefix}top/then/scores"])], "soft_nms_top", [],
        [helper.make_tensor_value_info(f"{prefix}top/then/indices", TensorProto.INT64, None),
         helper.make_tensor_value_info(f"{prefix}top/then/scores", full_graph.output[1].type.tensor_type.elem_type,
                                       None)])
    full = onnx.GraphProto()
    full.CopyFrom(full_graph)
    out_names = {o: f"{prefix}top/else/{o}" for o in OUTPUT_NAMES}
    for node in full.node:
        node.output[:] = [out_names.get(o, o) for o in node.output]
    else_graph = helper.make_graph(list(full.node), "soft_nms_full", [], [
        helper.make_tensor_value_info(out_names[o.name], o.type.tensor_type.elem_type, None) for o in full.output])
    b.nodes.append(helper.make_node("If", [ok], list(OUTPUT_NAMES), name=f"{prefix}top",
                                    then_branch=then_graph, else_branch=else_graph))
    return helper.make_graph(b.nodes, "soft_nms", list(full_graph.input), list(full_graph.output))

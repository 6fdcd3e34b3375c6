"""Soft-NMS as a standard ONNX sub-graph (a ``Loop``; no custom op) with ``NonMaxSuppression``'s interface.

Inputs (as ONNX ``NonMaxSuppression``): ``boxes`` (B, N, 4) float, ``scores`` (B, C, N) float,
``max_output_boxes_per_class`` int64 (scalar or [1]), ``iou_threshold`` float, ``score_threshold`` float.
``center_point_box`` 0: boxes are [y1, x1, y2, x2] (any diagonal pair: min/max are taken); 1: [xc, yc, w, h].
Outputs: ``selected_indices`` int64 (M, 3) = (batch, class, box), grouped by batch then class, each group in
selection order (as onnxruntime orders its NMS output), and ``selected_scores`` (M,) in the scores' dtype: the
decayed score of each selected box.

Mapping of the NMS inputs (semantics: :mod:`passes.detect.config`): ``iou_threshold`` → N_t (linear gate, hard
and TF-Gaussian discard), ``score_threshold`` → ``min_score`` (kept when ≥, where ONNX NMS keeps when >; the two
differ only for a score exactly at the threshold), ``max_output_boxes_per_class`` → ``max_det`` per (batch,
class), 0 selecting nothing as in ONNX. The caller may feed constants instead (pass options override the node).

Structure: all B·C groups are processed together. One ``Loop`` iteration picks, per group, the live box with the
largest current score (``ArgMax``) and applies its factors (weights, discards) to every box; the picks are scan
outputs, compacted after the loop with ``NonZero``. The one-pick graph (``window=0``) lives in
:mod:`passes.detect.onnx_one_pick` (4 ops per pick in the usual cases, :data:`STEPS` picks and one condition
per iteration; isolated boxes can skip the loop, :func:`use_isolate`). The factors are either gathered from
a (B, N+1, N+1) matrix computed once before the loop (``matrix=True``: fewest ops per iteration) or computed from
the pick's IoU row inside the loop (memory O(B·C·N)); :func:`use_matrix` chooses from the static box count, or
leaves it to an ``If`` at run time. The trip count is min(max_output_boxes_per_class, N) (at least 1; a cap of 0
marks every pick invalid) and the loop stops early once no group has a live box. Padding boxes appended to every
image (never live) make N = 0 work. Arithmetic is float64.

Multi-select step (``window`` W ≥ 1, :func:`_loop_body_multi`): an iteration selects, per group, the longest prefix
of the W top-scoring live boxes (``TopK``) that sequential Soft-NMS would pick one after the other unchanged, and
applies their decays in selection order: identical results, fewer iterations when top boxes do not overlap, more
ops per iteration. W zero boxes are appended instead of one. :func:`use_window` chooses W from the method and N.

In front of the loop, two exact shortcuts with the loop as their fallback (an ``If`` on a run-time proof): hard
Soft-NMS through onnxruntime's own ``NonMaxSuppression`` (:mod:`passes.detect.onnx_native`), and Soft-NMS on the
``top`` best boxes of each group (:mod:`passes.detect.onnx_top`, :func:`use_top`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from .config import SoftNMSConfig

#: Opset the sub-graph is written for (Split with num_outputs, ReduceSum/Squeeze/Unsqueeze with axes inputs).
OPSET = 18
INPUT_NAMES = ("boxes", "scores", "max_output_boxes_per_class", "iou_threshold", "score_threshold")
OUTPUT_NAMES = ("selected_indices", "selected_scores")
#: Box counts up to which the weight matrix is always used (few ops per iteration win on small inputs), and beyond
#: which it never is (8·N² bytes per image and matrix: 32 MB at 2048). See :func:`use_matrix`.
MATRIX_ALWAYS_BOXES = 256
#: Candidates per Loop iteration of the multi-select step (0: one ArgMax pick per iteration). See soft_nms_graph.
WINDOW = 8
#: Static box count from which, and class count up to which, :func:`use_window` turns the multi-select step on
#: (linear and hard).
WINDOW_MIN_BOXES = 100
WINDOW_MAX_CLASSES = 4
MATRIX_MAX_BOXES = 2048
#: Sequential picks per ``Loop`` iteration of the one-pick graph (the same ops as one pick per iteration, the loop
#: condition tested once per iteration; :mod:`passes.detect.onnx_one_pick`). Measured (docs/soft_nms.md, session 8):
#: 4 cuts the scenes' time at batch 1 by ~10–20% against 1; 8 is within noise of 4 at batch 1 and slower at 32.
STEPS = 4
#: Static box count from which :func:`use_isolate` takes isolated boxes out of the loop (linear).
ISOLATE_MIN_BOXES = 100
#: Coordinate magnitude up to which the unguarded IoU (:func:`_iou` with ``guard=False``) is exact: areas and their
#: sums stay finite in float64 (2·(2⁵⁰¹ + 1)² < 2¹⁰²⁴).
FINITE_BOUND = 2.0 ** 500


class _Builder:
    """Appends nodes to a list with fresh value names."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.count = 0

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs: Any) -> Any:
        names = [f"{self.prefix}{op_type.lower()}_{self.count}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=f"{self.prefix}{op_type}_{self.count}",
                                           **attrs))
        self.count += 1
        return names[0] if n_out == 1 else names

    def const(self, value: Any, dtype: Any) -> str:
        arr = np.asarray(value, dtype=dtype)
        name = f"{self.prefix}const_{self.count}"
        self.count += 1
        self.nodes.append(helper.make_node("Constant", [], [name], name=name,
                                           value=onnx.numpy_helper.from_array(arr, name)))
        return name


def _names_read(node: onnx.NodeProto) -> set[str]:
    """Values ``node`` reads, its sub-graphs' outer-scope reads included."""
    names = set(node.input)
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            for inner in attr.g.node:
                names |= _names_read(inner)
    return names


def _live_nodes(nodes: list[onnx.NodeProto], outputs: tuple[str, ...]) -> list[onnx.NodeProto]:
    """``nodes`` without those whose outputs nothing reads (e.g. a threshold a method does not use)."""
    needed, keep = set(outputs), []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed |= _names_read(node)
    return keep[::-1]


def _iou(b: _Builder, r: dict[str, str], c: dict[str, str], offset: str | None, guard: bool = True) -> str:
    """IoU of boxes ``r`` against boxes ``c`` (coordinate and ``area`` tensors that broadcast, float64); a union
    ≤ 0 gives 0. The same ops in the same order as :mod:`passes.detect.soft_nms`, so both pick the same boxes.
    ``offset`` None: an offset of 0, not added (x + 0 is x, or +0 for −0, which no later operation tells apart).

    ``guard`` False (the caller guarantees finite coordinates with |c| ≤ 2⁵⁰⁰, :data:`FINITE_BOUND`): inter /
    max(union, 2⁻¹⁰⁷⁴) instead of two ``Where``s, the same numbers up to the sign of a zero: no overflow, so every
    value is finite; a positive intersection needs both boxes upright in x and y, and rounding is monotone, so
    each area is ≥ inter and union = (area + area) − inter > 0 is unchanged by the max; union ≤ 0 has inter = ±0,
    and ±0 / 2⁻¹⁰⁷⁴ is ±0 (every later use of an IoU — o·o, o > N_t, 1 − o when o > N_t — ignores the sign)."""
    zero = b.const(0.0, np.float64)

    def extent(lo: str, hi: str) -> str:
        width = b.op("Sub", [b.op("Min", [c[hi], r[hi]]), b.op("Max", [c[lo], r[lo]])])
        return b.op("Max", [b.op("Add", [width, offset]) if offset else width, zero])

    inter = b.op("Mul", [extent("x1", "x2"), extent("y1", "y2")])
    union = b.op("Sub", [b.op("Add", [c["area"], r["area"]]), inter])
    if not guard:
        return b.op("Div", [inter, b.op("Max", [union, b.const(np.nextafter(0.0, 1.0), np.float64)])])
    positive = b.op("Greater", [union, zero])
    return b.op("Where", [positive, b.op("Div", [inter, b.op("Where", [positive, union,
                                                                        b.const(1.0, np.float64)])]), zero])


def _area(b: _Builder, d: dict[str, str], offset: str | None) -> str:
    """(x2 − x1 + offset)·(y2 − y1 + offset); ``offset`` None adds nothing (see :func:`_iou`)."""
    def side(lo: str, hi: str) -> str:
        width = b.op("Sub", [d[hi], d[lo]])
        return b.op("Add", [width, offset]) if offset else width

    return b.op("Mul", [side("x1", "x2"), side("y1", "y2")])


def _weights(b: _Builder, cfg: SoftNMSConfig, iou: str, iou_t: str, exponent: bool = False
             ) -> tuple[str | None, str | None]:
    """(score multiplier, discard mask) for an IoU tensor: None where the method has none. ``exponent``
    (Gaussian): the multiplier's exponent −o²/d instead (the caller applies ``Exp``)."""
    weights = discard = None
    if cfg.method == "linear":
        one = b.const(1.0, np.float64)
        weights = b.op("Where", [b.op("Greater", [iou, iou_t]), b.op("Sub", [one, iou]), one])
    elif cfg.method == "gaussian":  # exp(−(o·o)/d): −(x/d) is x/(−d) bit for bit, and x·(−1/d) when 1/d is exact
        d = float(cfg.gaussian_denominator)
        mantissa, _ = np.frexp(d)
        square = b.op("Mul", [iou, iou])
        weights = b.op("Mul", [square, b.const(-1.0 / d, np.float64)]) if mantissa == 0.5 else \
            b.op("Div", [square, b.const(-d, np.float64)])
        if not exponent:
            weights = b.op("Exp", [weights])
    if cfg.discards_above_threshold:
        discard = b.op("Greater", [iou, iou_t])
    return weights, discard


def _loop_body_multi(cfg: SoftNMSConfig, outer: dict[str, str], matrix: bool, window: int) -> onnx.GraphProto:
    """One multi-select iteration: (i, cond, s, alive, budget) → (cond', s', alive', budget', picks, pick_scores,
    pick_valid), picks (G, ``window``), ``budget`` (G, 1) the boxes each group may still select (``max_det`` −
    selected so far).

    Per group: the ``window`` live boxes with the largest current scores, sorted (``TopK``: ties to the lowest
    index, as ``ArgMax``), are candidates b_0 … b_{W−1}. The selected ones are the longest prefix in which every b_j
    is live, has a score > 0 (j ≥ 1), is within the ``max_det`` cap, and is left exactly unchanged by every earlier
    candidate (weight exactly 1 and not discarded). Sequential Soft-NMS selects that prefix in that order with these
    scores: b_0 is its pick; b_0 … b_{j−1} do not touch b_j, and every other box's score only moves down (a positive
    score times a weight ≤ 1) or stays ≤ 0 < s(b_j), so b_j is the next pick. The prefix's weights are then applied
    one pick after the other, in selection order, each followed by the ``min_score`` check, so every score is the
    same float64 number the one-pick-per-iteration loop computes.
    """
    b = _Builder("body/")
    i, cond, s, alive, budget = "body/i", "body/cond_in", "body/s", "body/alive", "body/budget"
    masked = b.op("Where", [alive, s, outer["neg_inf"]])
    values, cand = b.op("TopK", [masked, outer["window"]], n_out=2, axis=1, largest=1, sorted=1)  # (G, W)
    cand_valid = b.op("GatherElements", [alive, cand], axis=1)
    if matrix:
        rows = b.op("Concat", [outer["batch_rows"], b.op("Unsqueeze", [cand, outer["axis2"]])], axis=2)  # (G, W, 2)
        weights = b.op("GatherND", [outer["weights"], rows]) if "weights" in outer else None   # (G, W, N')
        discard = b.op("GatherND", [outer["discard"], rows]) if "discard" in outer else None
    else:
        pick = b.op("Split", [b.op("GatherND", [outer["packed"], b.op("Unsqueeze", [cand, outer["axis2"]])],
                                   batch_dims=1)], n_out=5, axis=2, num_outputs=5)     # 5 × (G, W, 1)
        keys = ("x1", "y1", "x2", "y2", "area")
        iou = _iou(b, dict(zip(keys, pick)), {k: outer[f"{k}_3d"] for k in keys}, outer["offset"])  # (G, W, N')
        weights, discard = _weights(b, cfg, iou, outer["iou"])
    # [g, i, j]: the factor candidate i applies to candidate j, 0 where i discards j (weights are in [0, 1])
    cand_cols = b.op("Expand", [b.op("Unsqueeze", [cand, outer["axis1"]]), outer["cand_shape"]])  # (G, W, W)
    factor = b.op("GatherElements", [weights, cand_cols], axis=2) if weights is not None else outer["one"]
    if discard is not None:
        factor = b.op("Where", [b.op("GatherElements", [discard, cand_cols], axis=2), outer["zero_f64"], factor])
    # j is untouched by every earlier candidate i < j: the least factor over i < j (1 put at i >= j) is exactly 1
    untouched = b.op("Equal", [b.op("ReduceMin", [b.op("Max", [factor, outer["not_upper"]]), outer["axis1"]],
                                    keepdims=0), outer["one"]])                        # (G, W)
    ok = b.op("And", [b.op("And", [cand_valid, untouched]),
                      b.op("And", [b.op("Or", [b.op("Greater", [values, outer["zero_f64"]]), outer["first"]]),
                                   b.op("Less", [outer["positions"], budget])])])
    sel = b.op("Equal", [b.op("CumSum", [b.op("Cast", [ok], to=TensorProto.INT64), outer["axis1_scalar"]]),
                         outer["positions_1"]])                                        # the prefix, (G, W)
    budget_out = b.op("Sub", [budget, b.op("ReduceSum", [b.op("Cast", [sel], to=TensorProto.INT64),
                                                         outer["axis1"]], keepdims=1)])
    kept = b.op("ScatterElements", [alive, cand, b.op("Xor", [cand_valid, sel])], axis=1)  # picks leave
    sel3 = b.op("Unsqueeze", [sel, outer["axis2"]])                                    # (G, W, 1)
    if discard is not None:
        hits = b.op("ReduceSum", [b.op("Cast", [b.op("And", [discard, sel3])], to=TensorProto.INT64),
                                  outer["axis1"]], keepdims=0)
        kept = b.op("And", [kept, b.op("Not", [b.op("Greater", [hits, outer["zero_i64"]])])])
    decayed = s
    if weights is not None:  # one pick after the other (float64 rounding as in the sequential loop)
        steps = b.op("Split", [b.op("Transpose", [b.op("Where", [sel3, weights, outer["one"]])], perm=[1, 0, 2])],
                     n_out=window, axis=0, num_outputs=window) if window > 1 else \
            [b.op("Transpose", [b.op("Where", [sel3, weights, outer["one"]])], perm=[1, 0, 2])]
        for w in steps:                                                                # (1, G, N') each
            decayed = b.op("Mul", [decayed, w])
            kept = b.op("And", [kept, b.op("GreaterOrEqual", [decayed, outer["min_score"]])])
        decayed = b.op("Squeeze", [decayed, outer["axis0"]])
        kept = b.op("Squeeze", [kept, outer["axis0"]])
    else:
        decayed = b.op("Identity", [s])
        kept = b.op("And", [kept, b.op("GreaterOrEqual", [decayed, outer["min_score"]])])
    under_cap = b.op("Greater", [budget_out, outer["zero_i64"]])
    live = b.op("ReduceSum", [b.op("Cast", [b.op("And", [kept, under_cap])], to=TensorProto.INT64)], keepdims=0)
    cond_out = b.op("Greater", [live, outer["zero_i64"]])
    outs = [cond_out, decayed, kept, budget_out, cand, values, sel]
    types = [TensorProto.BOOL, TensorProto.DOUBLE, TensorProto.BOOL, TensorProto.INT64, TensorProto.INT64,
             TensorProto.DOUBLE, TensorProto.BOOL]
    return helper.make_graph(
        b.nodes, "soft_nms_multi_step",
        [helper.make_tensor_value_info(i, TensorProto.INT64, []),
         helper.make_tensor_value_info(cond, TensorProto.BOOL, []),
         helper.make_tensor_value_info(s, TensorProto.DOUBLE, ["G", "N1"]),
         helper.make_tensor_value_info(alive, TensorProto.BOOL, ["G", "N1"]),
         helper.make_tensor_value_info(budget, TensorProto.INT64, ["G", 1])],
        [helper.make_tensor_value_info(n, t, shape) for n, t, shape in
         zip(outs, types, ([], ["G", "N1"], ["G", "N1"], ["G", 1], ["G", window], ["G", window], ["G", window]))])


def soft_nms_graph(cfg: SoftNMSConfig, center_point_box: int = 0, score_dtype: int = TensorProto.FLOAT,
                   prefix: str = "", matrix: bool | None = True, window: int | None = None,
                   native: bool = True, top: int = 0, steps: int | None = None,
                   isolate: bool | None = None, top_form: str = "auto") -> onnx.GraphProto:
    """The Soft-NMS graph: inputs :data:`INPUT_NAMES`, outputs :data:`OUTPUT_NAMES` (module docstring). Only
    ``cfg.method``, ``sigma``, ``sigma_convention`` and ``iou_offset`` are baked in; the thresholds and the cap are
    graph inputs. Value names are prefixed with ``prefix`` (inputs and outputs excepted).

    ``matrix``: precompute the (B, N+1, N+1) weight matrix once (fewest ops per iteration: fastest for small N;
    memory 8·B·N² bytes per matrix); otherwise compute each pick's IoU row in the loop (memory O(B·C·N)).
    Both give identical results (:func:`use_matrix` picks one from N). None (one pick per iteration only): an
    ``If`` picks the matrix when N ≤ :data:`MATRIX_ALWAYS_BOXES` at run time, else IoU rows.

    ``window``: candidates per ``Loop`` iteration (default :data:`WINDOW`). 0 picks one box per iteration
    (``ArgMax``); W ≥ 1 selects up to W boxes per iteration with the exact multi-select step of
    :func:`_loop_body_multi` (same indices and scores, fewer iterations when the top boxes do not overlap).

    ``native``: for ``hard`` with ``center_point_box`` 0, ``iou_offset`` 0 and float32 scores, try onnxruntime's
    ``NonMaxSuppression`` first and keep its result where a run-time check proves it equal to ours
    (:mod:`passes.detect.onnx_native`); the ``Loop`` otherwise.

    ``steps``: sequential picks per ``Loop`` iteration of the one-pick graph (default :data:`STEPS`).
    ``isolate``: boxes that no other box changes skip the one-pick loop (matrix form, usual mode; default off,
    :func:`use_isolate`); see :mod:`passes.detect.onnx_one_pick`.

    ``top`` > 0 (not with ``native`` hard): run Soft-NMS on the ``top`` highest-scoring boxes of every group first
    and keep that result where a run-time bound proves the other boxes irrelevant (:mod:`passes.detect.onnx_top`);
    the full graph otherwise. ``top_form``: how the window gets its factors: ``matrix`` (a (G, K+1, K+1) matrix),
    ``rows`` (IoU rows in the loop), ``run-time`` (an ``If``: the matrix for a single group, rows for more), or
    ``auto``: ``run-time`` for Gaussian, ``matrix`` otherwise (linear's isolated boxes need the matrix)."""
    forms = {"matrix": True, "rows": False, "run-time": None}
    if top_form not in forms and top_form != "auto":
        raise ValueError(f"soft-nms: top_form={top_form!r}: must be one of auto, {', '.join(forms)}")
    top_matrix = forms.get(top_form, None if cfg.method == "gaussian" else True)
    return _graph(cfg, center_point_box, score_dtype, prefix,
                  GraphForm(matrix, WINDOW if window is None else int(window), native, top,
                            STEPS if steps is None else int(steps), bool(isolate), top_matrix=top_matrix))


@dataclass(frozen=True)
class GraphForm:
    """How :func:`soft_nms_graph` builds the graph (its keyword arguments, defaults resolved); the recursive
    builders pass one of these on, changed with :func:`dataclasses.replace`. Set only for the top window's graph
    (:mod:`passes.detect.onnx_top`, whose result is taken only after a check of the coordinates): ``finite`` (the
    coordinates are finite with |c| ≤ :data:`FINITE_BOUND`: the IoU needs no union guard), ``exp_rows`` (Gaussian
    matrix: ``Exp`` on the picked rows in the loop), ``max_matrix_groups`` (``matrix`` None: the matrix when there
    are at most this many groups, else IoU rows). ``top_matrix``: the window's ``matrix`` (None: run-time)."""

    matrix: bool | None = True
    window: int = WINDOW
    native: bool = True
    top: int = 0
    steps: int = STEPS
    isolate: bool = False
    finite: bool = False
    exp_rows: bool = False
    max_matrix_groups: int = 0
    top_matrix: bool | None = True


def _graph(cfg: SoftNMSConfig, center_point_box: int, score_dtype: int, prefix: str, form: GraphForm
           ) -> onnx.GraphProto:
    """:func:`soft_nms_graph` with its options in ``form``."""
    window = form.window
    if window < 0:
        raise ValueError(f"soft-nms: window={window!r}: must be >= 0")
    from .onnx_native import applies, native_hard_graph
    native = form.native and applies(cfg.method, center_point_box, cfg.iou_offset, score_dtype)
    if form.top > 0 and not native:
        from .onnx_top import top_window_graph
        return top_window_graph(_graph(cfg, center_point_box, score_dtype, f"{prefix}win/",
                                       replace(form, matrix=form.top_matrix, window=0, top=0, finite=True,
                                               max_matrix_groups=1, exp_rows=True)),
                                _graph(cfg, center_point_box, score_dtype, prefix, replace(form, top=0)),
                                form.top, prefix)
    if native:
        return native_hard_graph(_graph(cfg, center_point_box, score_dtype, prefix, replace(form, native=False, top=0)),
                                 prefix)
    if window == 0:
        from .onnx_one_pick import one_pick_graph
        return one_pick_graph(cfg, center_point_box, score_dtype, prefix, form.matrix, MATRIX_ALWAYS_BOXES,
                              steps=form.steps, isolate=form.isolate, finite=form.finite,
                              exp_rows=form.exp_rows, max_matrix_groups=form.max_matrix_groups)
    matrix = form.matrix
    matrix = bool(matrix)  # the multi-select step has no run-time choice: None means IoU rows
    pad = max(1, window)  # never-live zero boxes appended to every image (TopK needs >= window columns)
    b = _Builder(prefix)
    i64 = lambda v: b.const(v, np.int64)  # noqa: E731
    boxes, scores, max_in, iou_in, score_in = INPUT_NAMES
    scalar = i64(np.zeros(0, np.int64))
    max_out = b.op("Reshape", [max_in, scalar])
    iou_t = b.op("Cast", [b.op("Reshape", [iou_in, scalar])], to=TensorProto.DOUBLE)
    min_score = b.op("Cast", [b.op("Reshape", [score_in, scalar])], to=TensorProto.DOUBLE)
    shape = b.op("Shape", [scores])                                                     # [B, C, N]
    n = b.op("Slice", [shape, i64([2]), i64([3])])
    n_scalar = b.op("Reshape", [n, scalar])
    n_classes = b.op("Slice", [shape, i64([1]), i64([2])])
    groups = b.op("Mul", [b.op("Slice", [shape, i64([0]), i64([1])]), n_classes])        # [G] = [B·C]
    divisor = b.op("Max", [n_classes, i64([1])])  # C = 0 has no groups to split, but integer Div/Mod by 0 fail
    flat_shape = b.op("Concat", [groups, n], axis=0)                                    # [G, N] (N may be 0)
    # boxes → (B, N + pad) float64 coordinates, ``pad`` zero boxes appended (the padding columns: never live)
    zeros = helper.make_tensor("z", TensorProto.DOUBLE, [1], [0.0])
    pad_box = b.op("ConstantOfShape", [b.op("Concat", [b.op("Slice", [shape, i64([0]), i64([1])]), i64([pad, 4])],
                                                 axis=0)], value=zeros)
    padded = b.op("Concat", [b.op("Cast", [boxes], to=TensorProto.DOUBLE), pad_box], axis=1)  # (Pad fails on N = 0)
    coords = [b.op("Squeeze", [c, i64([2])]) for c in b.op("Split", [padded], n_out=4, axis=2, num_outputs=4)]
    if center_point_box == 0:  # [y1, x1, y2, x2], either diagonal
        ya, xa, yb, xb = coords
        x1, x2, y1, y2 = b.op("Min", [xa, xb]), b.op("Max", [xa, xb]), b.op("Min", [ya, yb]), b.op("Max", [ya, yb])
    else:  # [xc, yc, w, h]
        xc, yc, w, h = coords
        half = b.const(0.5, np.float64)
        hw, hh = b.op("Mul", [w, half]), b.op("Mul", [h, half])
        x1, x2, y1, y2 = b.op("Sub", [xc, hw]), b.op("Add", [xc, hw]), b.op("Sub", [yc, hh]), b.op("Add", [yc, hh])
    offset = b.const(float(cfg.iou_offset), np.float64)
    outer = {"neg_inf": b.const(-np.inf, np.float64), "zero_i64": i64(0), "min_score": min_score, "iou": iou_t,
             "offset": offset}
    box = {"x1": x1, "y1": y1, "x2": x2, "y2": y2}
    box["area"] = _area(b, box, offset)                                                 # (B, N + 1) each
    if matrix:
        r = {k: b.op("Unsqueeze", [v, i64([2])]) for k, v in box.items()}               # (B, N+1, 1): the pick
        c = {k: b.op("Unsqueeze", [v, i64([1])]) for k, v in box.items()}               # (B, 1, N+1)
        weights, discard = _weights(b, cfg, _iou(b, r, c, offset), iou_t)               # (B, N+1, N+1)
        outer.update({k: v for k, v in (("weights", weights), ("discard", discard)) if v is not None})
    s_flat = b.op("Reshape", [b.op("Cast", [scores], to=TensorProto.DOUBLE), flat_shape], allowzero=1)  # (G, N)
    s0 = b.op("Concat", [s_flat, b.op("ConstantOfShape", [b.op("Concat", [groups, i64([pad])], axis=0)],
                                      value=zeros)], axis=1)                            # (G, N + pad)
    real = b.op("Less", [b.op("Range", [i64(0), b.op("Add", [n_scalar, i64(pad)]), i64(1)]), n_scalar])
    alive0 = b.op("And", [b.op("GreaterOrEqual", [s0, min_score]), b.op("Unsqueeze", [real, i64([0])])])
    if matrix:
        group_ids = b.op("Range", [i64(0), b.op("Reshape", [groups, scalar]), i64(1)])
        outer["batch_of_group"] = b.op("Unsqueeze", [b.op("Div", [group_ids, divisor]), i64([1])])  # (G, 1)
    outer["false_column"] = b.op("ConstantOfShape", [b.op("Concat", [groups, i64([1])], axis=0)],
                                 value=helper.make_tensor("f", TensorProto.BOOL, [1], [False]))
    trips = b.op("Max", [b.op("Min", [max_out, n_scalar]), i64(1)])
    if not matrix:  # every group's boxes, (G, N + 1) each, and packed (G, 5, N + 1) to gather the pick's row
        per_group_shape = b.op("Concat", [groups, b.op("Add", [n, i64([pad])])], axis=0)
        batches = b.op("Slice", [shape, i64([0]), i64([1])])
        expand_shape = b.op("Concat", [batches, n_classes, b.op("Add", [n, i64([pad])])], axis=0)
        for k, v in box.items():
            outer[k] = b.op("Reshape", [b.op("Expand", [b.op("Unsqueeze", [v, i64([1])]), expand_shape]),
                                        per_group_shape], allowzero=1)
        outer["packed"] = b.op("Concat", [b.op("Unsqueeze", [outer[k], i64([2])]) for k in box], axis=2)  # (G, N+1, 5)
    outer.update({"window": i64([window]), "axis0": i64([0]), "axis1": i64([1]), "axis2": i64([2]),
                  "axis1_scalar": i64(1), "one": b.const(1.0, np.float64), "zero_f64": b.const(0.0, np.float64),
                  "not_upper": b.const(np.tril(np.ones((window, window))), np.float64),   # 1 at i >= j
                  "first": b.const(np.arange(window)[None] == 0, np.bool_),
                  "positions": i64(np.arange(window)[None]), "positions_1": i64(np.arange(1, window + 1)[None]),
                  "cand_shape": b.op("Concat", [groups, i64([window, window])], axis=0)})
    if matrix:
        outer["batch_rows"] = b.op("Unsqueeze", [b.op("Expand", [outer["batch_of_group"], b.op(
            "Concat", [groups, i64([window])], axis=0)]), i64([2])])                # (G, W, 1)
    else:
        for k in box:
            outer[f"{k}_3d"] = b.op("Unsqueeze", [outer[k], i64([1])])              # (G, 1, N + pad)
    budget0 = b.op("Add", [b.op("ConstantOfShape", [b.op("Concat", [groups, i64([1])], axis=0)],
                                value=helper.make_tensor("c", TensorProto.INT64, [1], [0])), max_out])  # (G, 1)
    body = _loop_body_multi(cfg, outer, matrix, window)
    _, _, _, picks, pick_scores, pick_valid = b.op(
        "Loop", [trips, b.const(True, np.bool_), s0, alive0, budget0], n_out=6, body=body)  # scans: (T, G, W)
    flat = i64([-1])
    pick_flat = b.op("Reshape", [b.op("Transpose", [picks], perm=[1, 0, 2]), flat])
    score_flat = b.op("Reshape", [b.op("Transpose", [pick_scores], perm=[1, 0, 2]), flat])
    valid_flat = b.op("And", [b.op("Reshape", [b.op("Transpose", [pick_valid], perm=[1, 0, 2]), flat]),
                              b.op("Greater", [max_out, i64(0)])])                     # a cap of 0 selects nothing
    pos = b.op("Reshape", [b.op("NonZero", [valid_flat]), flat])                         # (M,)
    scan_shape = b.op("Shape", [picks])
    steps = b.op("Mul", [b.op("Slice", [scan_shape, i64([0]), i64([1])]),
                         b.op("Slice", [scan_shape, i64([2]), i64([3])])])             # picks per group: T · W
    group = b.op("Div", [pos, steps])
    batch = b.op("Div", [group, divisor])
    klass = b.op("Mod", [group, divisor])
    box = b.op("Gather", [pick_flat, pos], axis=0)
    col = i64([1])
    b.nodes.append(helper.make_node("Concat", [b.op("Unsqueeze", [batch, col]), b.op("Unsqueeze", [klass, col]),
                                               b.op("Unsqueeze", [box, col])], [OUTPUT_NAMES[0]], axis=1,
                                    name=f"{prefix}selected_indices"))
    b.nodes.append(helper.make_node("Cast", [b.op("Gather", [score_flat, pos], axis=0)], [OUTPUT_NAMES[1]],
                                    to=score_dtype, name=f"{prefix}selected_scores"))
    inputs = [helper.make_tensor_value_info(boxes, score_dtype, ["B", "N", 4]),
              helper.make_tensor_value_info(scores, score_dtype, ["B", "C", "N"]),
              helper.make_tensor_value_info(max_in, TensorProto.INT64, [1]),
              helper.make_tensor_value_info(iou_in, TensorProto.FLOAT, [1]),
              helper.make_tensor_value_info(score_in, TensorProto.FLOAT, [1])]
    outputs = [helper.make_tensor_value_info(OUTPUT_NAMES[0], TensorProto.INT64, ["M", 3]),
               helper.make_tensor_value_info(OUTPUT_NAMES[1], score_dtype, ["M"])]
    return helper.make_graph(_live_nodes(b.nodes, OUTPUT_NAMES), "soft_nms", inputs, outputs)


def use_matrix(n_boxes: int | None, n_classes: int | None = None, max_det: int | None = None) -> bool | None:
    """Whether to precompute the weight matrix, from what is static (None: unknown N → None, the run-time choice).

    The matrix costs ~25 elementwise ops on B·N² values once; IoU rows cost ~22 more ops per iteration on B·C·N
    values, for T = min(max_det, N) iterations. So: the matrix when N ≤ :data:`MATRIX_ALWAYS_BOXES`, or when
    N ≤ :data:`MATRIX_MAX_BOXES` and C·T ≥ N (many classes or picks); rows otherwise. For an unknown N the graph
    decides at run time (an ``If`` on N ≤ :data:`MATRIX_ALWAYS_BOXES`: a matrix of an unbounded N could exhaust
    memory). Measured in tools/bench/soft_nms.py (docs/soft_nms.md).
    """
    if not isinstance(n_boxes, int):
        return None
    if n_boxes > MATRIX_MAX_BOXES:
        return False
    if n_boxes <= MATRIX_ALWAYS_BOXES:
        return True
    steps = n_boxes if not isinstance(max_det, int) else min(max_det, n_boxes)
    return isinstance(n_classes, int) and n_classes * steps >= n_boxes


def use_window(method: str, n_boxes: int | None, n_classes: int | None = None) -> int:
    """Candidates per Loop iteration the pass uses (0: one ``ArgMax`` pick per iteration), from the method and the
    static box and class counts (None: unknown).

    The multi-select body has ~10× the ops of the one-pick body (61 against 6, matrix form; ~84 against ~27 with
    IoU rows), so it pays only when it cuts the iteration count by more than that and the per-iteration work is
    small. Measured (tools/bench/soft_nms.py, docs/soft_nms.md) against the 6-op one-pick body: linear/hard on
    ≥ :data:`WINDOW_MIN_BOXES` random boxes of ≤ :data:`WINDOW_MAX_CLASSES` classes gain at batch 1 (most
    top-scoring candidates do not overlap) and tie or lose batched; 20 classes lose (one pick 3.6 ms against
    5.8 ms per image at 300 boxes); the ~30-box scenes lose; Bodla's Gaussian, which decays every box with IoU > 0,
    ends the prefix at the first overlap of any size, so it keeps the one-pick body. Linear (session 8) keeps the
    one-pick body with isolated boxes out of the loop (:func:`use_isolate`): 100 random boxes × 1 class 6.5× against
    13.9× onnxruntime's NMS at batch 1 with the multi-select step, a tie at 1000 × 4. Unknown N or C: one pick.
    """
    if method != "hard" or not isinstance(n_boxes, int) or n_boxes < WINDOW_MIN_BOXES or \
            not isinstance(n_classes, int) or n_classes > WINDOW_MAX_CLASSES:
        return 0
    return WINDOW


def use_isolate(method: str, n_boxes: int | None) -> bool:
    """Whether the one-pick graph takes isolated boxes (no other box changes them: factor exactly 1) out of the
    loop, from the method and the static box count (None: unknown). Linear only, for N ≥ :data:`ISOLATE_MIN_BOXES`:
    on 100–300 random boxes most linear interactions vanish (IoU ≤ N_t leaves a score unchanged), so the loop
    runs for the few boxes that interact (simulated iterations, 100 picks: 100 × 1 class 100 → 6, 300 × 20 classes
    100 → 51, the 200-box top window of 1000 boxes 100 → 27) at the price of ~6 ops around it; on the ~30-box
    scenes (most boxes overlap) it saves ~2 of 27 iterations and costs ~10%, and Bodla's Gaussian changes every
    overlapping box, so neither uses it (docs/soft_nms.md, session 8)."""
    return method == "linear" and isinstance(n_boxes, int) and n_boxes >= ISOLATE_MIN_BOXES


def use_top(method: str, n_boxes: int | None, n_classes: int | None, max_det: int | None) -> int:
    """The window of :mod:`passes.detect.onnx_top` the pass uses (0: none), from static counts (None: unknown):
    K = ⌈2.4·max_det⌉ (Gaussian) or ⌈1.5·max_det⌉ (linear) when N ≥ 4·K, K ≤ :data:`MATRIX_ALWAYS_BOXES` and at
    most :data:`WINDOW_MAX_CLASSES` classes; not for hard (onnxruntime's NonMaxSuppression handles it,
    :mod:`passes.detect.onnx_native`). Measured on 1000 random boxes, 100 picks (docs/soft_nms.md): with 20 classes
    a window per group costs more than the shared matrix. Gaussian (which decays every overlapping box): a group's
    100th pick had input-score rank 154–220 (median 185), so K = 200 fell back for ~12% of the groups (nearly
    always with 4 classes × 8 images, 1.5× the plain loop) and K = 240 for none; with the window's IoU rows for more
    than one group (session 9) 1000 × 4 boxes take 8–13× onnxruntime's NMS against 30–46× without a window.
    Linear with isolated boxes outside the loop (session 8): the window's N² matrix is most of the time, and linear
    rarely decays the top boxes, so K = 1.5·max_det: 1000 × 1 and 1000 × 4 boxes at N_t 0.3 and 0.5, batch 1 and 8,
    took the window with K = 144 or 200 every time (≈ 8–10× against 12–18× onnxruntime's NMS with K = 200); K = 128
    fell back once (1000 × 4, N_t 0.3, batch 8: 29×), K = 112 every time."""
    if method == "hard" or not all(isinstance(v, int) for v in (n_boxes, n_classes, max_det)):
        return 0
    k = (12 * max_det + 4) // 5 if method == "gaussian" else max_det + (max_det + 1) // 2
    return k if 0 < k <= MATRIX_ALWAYS_BOXES and n_boxes >= 4 * k and n_classes <= WINDOW_MAX_CLASSES else 0


def soft_nms_model(cfg: SoftNMSConfig, center_point_box: int = 0, score_dtype: int = TensorProto.FLOAT,
                   matrix: bool | None = True, window: int | None = None, native: bool = True, top: int = 0,
                   steps: int | None = None, isolate: bool | None = None, top_form: str = "auto"
                   ) -> onnx.ModelProto:
    """A standalone model of :func:`soft_nms_graph` (opset :data:`OPSET`), checked by ``onnx.checker``."""
    model = helper.make_model(soft_nms_graph(cfg, center_point_box, score_dtype, matrix=matrix, window=window,
                                             native=native, top=top, steps=steps,
                                             isolate=isolate, top_form=top_form),
                              opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model

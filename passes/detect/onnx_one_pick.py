"""The one-pick Soft-NMS sub-graph (one box per group per ``Loop`` iteration), written for few ops per iteration
and few ops around the loop. Interface and semantics: :mod:`passes.detect.onnx_nms` (``soft_nms_graph`` with
``window=0`` builds this graph).

State: the current scores ``s`` (B, C, N + 1) in float64 (a padding column makes N = 0 work); no separate live
mask. A pick's effect on every box is a *factor* row, taken from a (B, N + 1, N + 1) matrix computed before the
loop (``matrix``; one ``GatherND``) or computed from the pick's IoU row in the loop (memory O(B·C·N)); the IoU is
the same sequence of operations as in :mod:`passes.detect.onnx_nms` and the torch form. Three modes, each
exact (the same picks and the same float64 decayed scores as the reference loop):

- ``min`` (hard): dead boxes are −∞ (the ``min_score`` test is applied once: hard scores never change); the
  factor is +∞, or −∞ where the pick discards the box and on the pick itself. Iteration (6 ops):
  ``p = ArgMax(s); best = s[p]; s' = Min(s, factor[p]); cond = max(s') > −∞``; a pick is real iff best > −∞.
- ``zero`` (linear / Gaussian when ``min_score`` > 0 and every score < +∞, the usual case): the factor is the
  method's weight in [0, 1], 0 where the pick discards the box and on the pick itself; boxes below ``min_score``
  start at 0. Iteration (6 ops): ``p = ArgMax(s); best = s[p]; s' = s·factor[p]; cond = max(s') ≥ min_score``;
  a pick is real iff best ≥ min_score. A box that fell below ``min_score`` is never marked dead, and need not be:
  its score stays in [0, min_score) (factors are in [0, 1]) while every live score is ≥ min_score, so it is never
  the pick of a group that still has a live box, and never a real pick.
- ``nan`` (the rest: min_score ≤ 0, +∞ scores): dead boxes are −∞; NaN factors remove (a live score times NaN is
  NaN, which fails the test; a dead −∞ times any factor is −∞ or NaN and stays −∞). Iteration (8 ops):
  ``d = s·factor[p]; s' = where(d ≥ min_score, d, −∞); cond = max(s') > −∞``; a pick is real iff
  best > −∞.

``steps`` > 1 unrolls the loop: each iteration makes ``steps`` picks one after the other (each step the ops of a
one-pick iteration, so the same numbers) and tests the loop condition once, after the last. A step after its
group ran out of live boxes makes an invalid pick, as a one-pick iteration after that would, and changes no live
score (zero: every score is then < ``min_score`` and stays so; nan / min: −∞ stays −∞). The trip count is
⌈T / steps⌉ (T = min(cap, N), at least 1) and picks past T are cut after the loop. Fewer iterations cost less:
the ``Loop``'s own overhead, the condition and a scan output per iteration.

``isolate`` (matrix form, zero mode; linear): a box whose factor from every other box is exactly 1 (IoU ≤ N_t for
linear; factors are symmetric, so it changes no other box either) is *isolated*: its score never changes, so it
is selected with its input score (if ≥ ``min_score``) wherever that falls in the order, and the loop runs without
it. The order is then recovered by one sort: in a group, the score a pick is selected with is the maximum of the
current scores, and scores only go down, so selection scores never increase; among equal ones the lower index
goes first (a box of equal current score and lower index would have been picked before). So the selection order
is (selection score descending, index ascending) — ``TopK``'s order — over the loop's picks and the isolated
boxes, and its first T entries are the capped result (the loop's picks in that order are its own order, so its
first T picks suffice). The picks are written back in place with ``ScatterElements(reduction="max")``: an invalid
pick's score is < ``min_score`` ≤ every real one.

``mode`` None builds ``min`` for hard and an ``If`` (``zero`` else ``nan``) for linear / Gaussian; ``matrix`` None
an ``If`` on the run-time box count. A cap of 0 (``max_output_boxes_per_class``) turns ``min_score`` into NaN:
nothing is live. One deviation from the reference loop: a box whose input score is −∞ is never selected (the
reference selects it when there is no score threshold).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from .config import SoftNMSConfig


def _factor(b, cfg: SoftNMSConfig, iou: str, k: dict[str, str]) -> str:
    """The factor for an IoU tensor (module docstring, by ``k["mode"]``): ``nan``: the method's weight, NaN where
    the pick discards the box; ``zero``: the same with 0 for NaN; ``min`` (hard): +∞, −∞ where discarded."""
    from .onnx_nms import _weights
    weights, discard = _weights(b, cfg, iou, k["iou"], exponent=k.get("exp_rows", False))
    if k["mode"] == "min":
        return b.op("Where", [discard, k["neg_inf"], k["pos_inf"]])
    factor = weights if weights is not None else k["one"]
    if discard is not None:
        factor = b.op("Where", [discard, k["kill"], factor])
    return factor


def _body(cfg: SoftNMSConfig, k: dict[str, str], matrix: bool, steps: int = 1) -> onnx.GraphProto:
    """One iteration, ``steps`` sequential picks (each the same ops as a one-pick iteration, so the same float64
    numbers): (i, cond, s) → (cond', s', picks (B, C, steps) int64, their scores (B, C, steps)). The condition is
    tested once per iteration, after the last step: a step after a group ran out of live boxes picks a box that is
    not live (an invalid pick: its score fails the validity test after the loop) and changes no live score."""
    from .onnx_nms import _Builder, _iou
    b = _Builder("body/")
    i, cond, s = "body/i", "body/cond_in", "body/s"
    picks, bests = [], []
    for _ in range(steps):
        idx = b.op("ArgMax", [s], axis=2, keepdims=1)                                    # (B, C, 1)
        picks.append(idx)
        bests.append(b.op("GatherElements", [s, idx], axis=2))
        if matrix:
            factor = b.op("GatherND", [k["factor"], idx], batch_dims=1)                 # (B, C, N')
            if k.get("exp_rows"):  # the matrix holds the Gaussian exponents (−∞: the factor 0)
                factor = b.op("Exp", [factor])
        else:
            keys = ("x1", "y1", "x2", "y2", "area")
            pick = b.op("Split", [b.op("GatherND", [k["packed"], idx], batch_dims=1)], n_out=5, axis=2,
                        num_outputs=5)                                                  # 5 × (B, C, 1)
            iou = _iou(b, dict(zip(keys, pick)), {c: k[f"{c}_cols"] for c in keys}, k["offset"],
                       guard=not k["finite"])                                           # (B, C, N')
            factor = b.op("ScatterElements", [_factor(b, cfg, iou, k), idx, k["kill_column"]], axis=2)  # pick leaves
        if k["mode"] == "min":  # hard: scores never change; discarded boxes (and the pick) become −∞
            s = b.op("Min", [s, factor])
        elif k["mode"] == "zero":  # min_score > 0: a box below it can never be selected again, no need to mark it
            s = b.op("Mul", [s, factor])
        else:
            decayed = b.op("Mul", [s, factor])
            s = b.op("Where", [b.op("GreaterOrEqual", [decayed, k["min_score"]]), decayed, k["neg_inf"]])
    if k["mode"] == "zero":
        cond_out = b.op("GreaterOrEqual", [b.op("ReduceMax", [s], keepdims=0), k["min_score_scalar"]])
    else:
        cond_out = b.op("Greater", [b.op("ReduceMax", [s], keepdims=0), k["neg_inf"]])
    if steps > 1:
        picks, bests = [b.op("Concat", picks, axis=2)], [b.op("Concat", bests, axis=2)]
    value = helper.make_tensor_value_info
    return helper.make_graph(
        b.nodes, "soft_nms_step",
        [value(i, TensorProto.INT64, []), value(cond, TensorProto.BOOL, []),
         value("body/s", TensorProto.DOUBLE, ["B", "C", "N1"])],
        [value(cond_out, TensorProto.BOOL, []), value(s, TensorProto.DOUBLE, ["B", "C", "N1"]),
         value(picks[0], TensorProto.INT64, ["B", "C", steps]),
         value(bests[0], TensorProto.DOUBLE, ["B", "C", steps])])


def _choice(prefix: str, tag: str, condition, then_graph: onnx.GraphProto, else_graph: onnx.GraphProto
            ) -> onnx.GraphProto:
    """A graph ``If condition then then_graph else else_graph`` (same inputs and outputs); the two become branches
    that read the graph inputs from the outer scope. ``condition(b)`` appends the nodes of a one-element bool."""
    from .onnx_nms import OUTPUT_NAMES, _Builder

    def branch(g: onnx.GraphProto, name: str) -> onnx.GraphProto:
        renamed = {out: f"{prefix}{tag}_{name}/{out}" for out in OUTPUT_NAMES}
        for node in g.node:
            node.output[:] = [renamed.get(o, o) for o in node.output]
        return helper.make_graph(list(g.node), f"soft_nms_{tag}_{name}", [], [
            helper.make_tensor_value_info(renamed[o.name], o.type.tensor_type.elem_type, None) for o in g.output])

    b = _Builder(f"{prefix}{tag}/")
    b.nodes.append(helper.make_node("If", [condition(b)], list(OUTPUT_NAMES), name=f"{prefix}{tag}",
                                    then_branch=branch(then_graph, "then"), else_branch=branch(else_graph, "else")))
    return helper.make_graph(b.nodes, "soft_nms", list(then_graph.input), list(then_graph.output))


def one_pick_graph(cfg: SoftNMSConfig, center_point_box: int, score_dtype: int, prefix: str,
                   matrix: bool | None, max_matrix_boxes: int = 256, mode: str | None = None, steps: int = 1,
                   isolate: bool = False, finite: bool = False, exp_rows: bool = False,
                   max_matrix_groups: int = 0) -> onnx.GraphProto:
    """The graph (inputs ``INPUT_NAMES``, outputs ``OUTPUT_NAMES`` of :mod:`passes.detect.onnx_nms`).
    ``matrix`` None: chosen at run time, the matrix when N ≤ ``max_matrix_boxes`` (an ``If``), or, with
    ``max_matrix_groups`` > 0, when there are at most that many groups B·C (the top window's Gaussian choice).
    ``mode`` (module docstring) None: ``min`` for hard; for linear / Gaussian an ``If`` takes ``zero`` when
    min_score > 0 and every score is < +∞ (the usual case), else ``nan``. ``finite``: the caller guarantees finite
    coordinates with |c| ≤ :data:`passes.detect.onnx_nms.FINITE_BOUND` (the top window checks it before taking the
    result): the IoU (matrix or rows) drops its union guard (``_iou`` with ``guard=False``) and, in zero mode, the
    matrix's diagonal is cleared by arithmetic instead of a ``Where`` (f − f·I; the entries are finite there, so the
    same numbers). ``exp_rows`` (Gaussian, matrix form, zero mode): the matrix holds the exponents −o²/d (the pick
    itself: −10³⁰⁸ with ``finite``, else −∞; a discard: −∞) and each pick's row goes through ``Exp`` in the loop
    (both give exactly 0): one more op per pick, but ``Exp`` (~3 ns per float64 in onnxruntime, as much as the rest
    of the matrix) runs on the picked rows only, not on all (N + 1)² pairs: for the top window, ~100 of 241 rows."""
    from .onnx_nms import INPUT_NAMES, OUTPUT_NAMES, _Builder, _area, _iou, _live_nodes
    if matrix is None:
        def small(b: _Builder) -> str:
            shape = b.op("Shape", [INPUT_NAMES[1]])
            if max_matrix_groups:  # groups B·C (the top window: (G, 1, K) scores)
                groups = b.op("Mul", [b.op("Slice", [shape, b.const([0], np.int64), b.const([1], np.int64)]),
                                      b.op("Slice", [shape, b.const([1], np.int64), b.const([2], np.int64)])])
                return b.op("LessOrEqual", [groups, b.const([max_matrix_groups], np.int64)])
            n = b.op("Slice", [shape, b.const([2], np.int64), b.const([3], np.int64)])
            return b.op("LessOrEqual", [n, b.const([max_matrix_boxes], np.int64)])
        return _choice(prefix, "form", small, *(one_pick_graph(cfg, center_point_box, score_dtype, f"{prefix}{t}/",
                                                                m, max_matrix_boxes, mode, steps, isolate, finite,
                                                                exp_rows, max_matrix_groups)
                                                 for t, m in (("matrix", True), ("rows", False))))
    if mode is None and cfg.method == "hard":
        mode = "min"
    if mode is None:
        def fast(b: _Builder) -> str:  # float32 / float64 scores are compared as they are (same truth values)
            native = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64}.get(score_dtype)
            scores = INPUT_NAMES[1] if native else b.op("Cast", [INPUT_NAMES[1]], to=TensorProto.DOUBLE)
            top = b.op("ReduceMax", [scores], keepdims=0)
            return b.op("And", [b.op("Greater", [INPUT_NAMES[4], b.const(0.0, np.float32)]),
                                b.op("Less", [top, b.const(np.inf, native or np.float64)])])
        return _choice(prefix, "kill", fast, *(one_pick_graph(cfg, center_point_box, score_dtype, f"{prefix}{m}/",
                                                               matrix, max_matrix_boxes, m, steps, isolate, finite,
                                                               exp_rows, max_matrix_groups)
                                                 for m in ("zero", "nan")))
    b = _Builder(prefix)
    i64 = lambda v: b.const(v, np.int64)  # noqa: E731
    f64 = lambda v: b.const(v, np.float64)  # noqa: E731
    boxes, scores, max_in, iou_in, score_in = INPUT_NAMES
    k = {"one": f64(1.0), "nan": f64(np.nan), "neg_inf": f64(-np.inf), "pos_inf": f64(np.inf), "mode": mode,
         "finite": finite,
         "offset": f64(float(cfg.iou_offset)) if cfg.iou_offset else None,  # 0: not added
         "iou": b.op("Cast", [iou_in], to=TensorProto.DOUBLE)}
    dead = f64(0.0) if mode == "zero" else k["neg_inf"]  # the score of a box that is not live
    k["kill"] = f64(0.0) if mode == "zero" else k["nan"]  # the factor that removes a box (min mode: −∞)
    if mode == "min":
        k["kill"] = k["neg_inf"]
    k["min_score"] = b.op("Where", [b.op("Greater", [max_in, i64(0)]), b.op("Cast", [score_in], to=TensorProto.DOUBLE),
                                    k["nan"]])                                          # cap 0: nothing is live
    if mode == "zero":  # the Loop's condition is a scalar
        k["min_score_scalar"] = b.op("Reshape", [k["min_score"], i64(np.zeros(0, np.int64))])
    shape = b.op("Shape", [scores])                                                     # [B, C, N]
    n = b.op("Slice", [shape, i64([2]), i64([3])])
    batch_classes_1 = b.op("Concat", [b.op("Slice", [shape, i64([0]), i64([2])]), i64([1])], axis=0)  # [B, C, 1]
    # boxes → (B, N + 1, 4) float64 with a zero box appended (``Pad`` handles N = 0 in onnxruntime 1.32; tested)
    padded = b.op("Pad", [b.op("Cast", [boxes], to=TensorProto.DOUBLE), i64([0, 0, 0, 0, 1, 0]), f64(0.0)])
    # coordinates (B, N', 1) each: Gather with a 1-element index keeps the axis; the matrix form gets the (B, 1, N')
    # rows from one Concat + Transpose + Split instead of an Unsqueeze per tensor and side
    coords = [b.op("Gather", [padded, i64([a])], axis=2) for a in range(4)]              # 4 × (B, N', 1)
    if center_point_box == 0:  # [y1, x1, y2, x2], either diagonal
        ya, xa, yb, xb = coords
        x1, x2, y1, y2 = b.op("Min", [xa, xb]), b.op("Max", [xa, xb]), b.op("Min", [ya, yb]), b.op("Max", [ya, yb])
    else:  # [xc, yc, w, h]
        xc, yc, w, h = coords
        hw, hh = b.op("Mul", [w, f64(0.5)]), b.op("Mul", [h, f64(0.5)])
        x1, x2, y1, y2 = b.op("Sub", [xc, hw]), b.op("Add", [xc, hw]), b.op("Sub", [yc, hh]), b.op("Add", [yc, hh])
    box = {"x1": x1, "y1": y1, "x2": x2, "y2": y2}
    box["area"] = _area(b, box, k["offset"])                                            # (B, N', 1)
    isolate = isolate and matrix and mode == "zero"
    if exp_rows and matrix and mode == "zero" and cfg.method == "gaussian":
        k["exp_rows"] = True
        k["kill"] = k["neg_inf"]  # the exponent of the factor 0
        isolate = False
    if matrix:  # [b, p, j]: the factor picking p applies to j; NaN on the diagonal (the pick leaves)
        rows = b.op("Split", [b.op("Transpose", [b.op("Concat", list(box.values()), axis=2)], perm=[0, 2, 1])],
                    n_out=5, axis=1, num_outputs=5)                                     # 5 × (B, 1, N')
        factor = _factor(b, cfg, _iou(b, box, dict(zip(box, rows)), k["offset"], guard=not finite), k)
        n1 = b.op("Add", [n, i64([1])])
        unit = b.op("EyeLike", [b.op("ConstantOfShape", [b.op("Concat", [n1, n1], axis=0)])], dtype=TensorProto.DOUBLE)
        if finite and mode == "zero":  # factors are finite here (0 for a discard): f − f·1 = 0 on the diagonal,
            # f − f·0 = f off it; exponents (≤ 0, −∞ for a discard): f − 10³⁰⁸·1 ≈ −10³⁰⁸ (exp: 0) on it, f − 0 off
            k["factor"] = b.op("Sub", [factor, b.op("Mul", [b.const(1e308, np.float64), unit])
                                       if k.get("exp_rows") else b.op("Mul", [factor, unit])])
            eye = None
        else:
            eye = b.op("Cast", [unit], to=TensorProto.BOOL)
            k["factor"] = b.op("Where", [eye, k["kill"], factor])
        if isolate:  # boxes no other box changes (factor exactly 1 off the diagonal; symmetric), (B, 1, N')
            eye = eye or b.op("Cast", [unit], to=TensorProto.BOOL)
            isolated = b.op("Equal", [b.op("ReduceMin", [b.op("Where", [eye, k["one"], factor]), i64([1])],
                                           keepdims=1), k["one"]])
    else:  # columns (B, 1, N') and packed (B, N', 5) to gather the pick's row
        for c, v in box.items():
            k[f"{c}_cols"] = b.op("Transpose", [v], perm=[0, 2, 1])
        k["packed"] = b.op("Concat", list(box.values()), axis=2)
        kill = {"zero": 0.0, "min": -np.inf}.get(mode, np.nan)
        k["kill_column"] = b.op("ConstantOfShape", [batch_classes_1],
                                value=helper.make_tensor("q", TensorProto.DOUBLE, [1], [kill]))
    s = b.op("Pad", [b.op("Cast", [scores], to=TensorProto.DOUBLE), i64([0, 0, 0, 0, 0, 1]),
                     k["neg_inf"]])                                                     # (B, C, N + 1)
    s0 = b.op("Where", [b.op("GreaterOrEqual", [s, k["min_score"]]), s, dead])  # NaN scores: never live
    if isolate:  # isolated boxes leave the loop: each is selected with its input score (module docstring)
        recorded = b.op("Where", [isolated, s0, dead])
        s0 = b.op("Where", [isolated, dead, s0])
    picks_max = b.op("Max", [b.op("Min", [max_in, n]), i64([1])])                       # [T]
    trips = picks_max if steps == 1 else b.op("Div", [b.op("Add", [picks_max, i64([steps - 1])]), i64([steps])])
    trips = b.op("Reshape", [trips, i64(np.zeros(0, np.int64))])
    _, picks, bests = b.op("Loop", [trips, b.const(True, np.bool_), s0], n_out=3,
                           body=_body(cfg, k, matrix, steps))                            # (iterations, B, C, steps)
    picks = b.op("Transpose", [picks], perm=[1, 2, 0, 3])                                # (B, C, T, 1)
    bests = b.op("Transpose", [bests], perm=[1, 2, 0, 3])
    if steps > 1 or isolate:  # (B, C, iterations, steps) → (B, C, iterations·steps) (the loop may stop early,
        # so the iteration count is read from the shape; an explicit shape: -1 fails on an empty batch)
        flat = b.op("Mul", [b.op("Slice", [b.op("Shape", [picks]), i64([0]), i64([3])]), i64([1, 1, steps])])
        picks, bests = (b.op("Reshape", [v, flat]) for v in (picks, bests))
    if isolate:  # every selected box's score at its selection, in place; the order: by that score, ties to the
        # lower index (TopK's order), the first T of it (the cap)
        recorded = b.op("ScatterElements", [recorded, picks, bests], axis=2, reduction="max")
        bests, picks = b.op("TopK", [recorded, picks_max], n_out=2, axis=2, largest=1, sorted=1)  # (B, C, T)
    elif steps > 1:  # the picks past the cap T are cut
        picks, bests = (b.op("Slice", [v, i64([0]), picks_max, i64([2])]) for v in (picks, bests))
    valid = b.op("GreaterOrEqual", [bests, k["min_score"]]) if mode == "zero" else \
        b.op("Greater", [bests, k["neg_inf"]])                                          # the pick was live
    where = b.op("Transpose", [b.op("NonZero", [valid])], perm=[1, 0])                  # (M, 4)
    box = b.op("Unsqueeze", [b.op("GatherND", [picks, where]), i64([1])])               # (M, 1)
    b.nodes.append(helper.make_node("Concat", [b.op("Slice", [where, i64([0]), i64([2]), i64([1])]), box],
                                    [OUTPUT_NAMES[0]], axis=1, name=f"{prefix}selected_indices"))
    b.nodes.append(helper.make_node("Cast", [b.op("GatherND", [bests, where])], [OUTPUT_NAMES[1]], to=score_dtype,
                                    name=f"{prefix}selected_scores"))
    value = helper.make_tensor_value_info
    inputs = [value(boxes, score_dtype, ["B", "N", 4]), value(scores, score_dtype, ["B", "C", "N"]),
              value(max_in, TensorProto.INT64, [1]), value(iou_in, TensorProto.FLOAT, [1]),
              value(score_in, TensorProto.FLOAT, [1])]
    outputs = [value(OUTPUT_NAMES[0], TensorProto.INT64, ["M", 3]), value(OUTPUT_NAMES[1], score_dtype, ["M"])]
    return helper.make_graph(_live_nodes(b.nodes, OUTPUT_NAMES), "soft_nms", inputs, outputs)

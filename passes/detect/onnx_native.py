"""Hard Soft-NMS through the standard ``NonMaxSuppression`` op, with a run-time proof of agreement and the Soft-NMS
``Loop`` as the fallback.

Hard Soft-NMS is greedy NMS with unchanged scores, so ONNX ``NonMaxSuppression`` would compute it much faster than
our ``Loop`` (onnxruntime sorts once and compares each candidate only with the boxes kept so far), but two of its
conventions are not ours, so it is used only where they provably cannot change the result:

- **IoU precision.** onnxruntime computes IoU in float32; ours (and the reference loop) in float64. They can
  disagree at the threshold: boxes [0, 0, 1, 2423384] and [0, 1304899, 1, 3728283] (y1, x1, y2, x2; integers, exact
  in float32) have IoU 1118485 / 3728283 = 0.30000003 > N_t = float32(0.3), but the float32 division rounds to
  exactly float32(0.3), so onnxruntime keeps both boxes and the reference suppresses the second.
- **Ties.** onnxruntime's candidate queue orders by score only (``ScoreIndexPair::operator<``); the order among
  equal scores is the heap's, not "lowest index first" (it happened to be in every case we tried, but nothing
  guarantees it).

The graph therefore runs ``NonMaxSuppression`` twice, with N_t·(1 − 2⁻¹⁶) and N_t·(1 + 2⁻¹⁶) (float32, clamped to
[0, 1]), and takes its result only if (run-time ``If``):

1. both runs select exactly the same (batch, class, box) rows in the same order;
2. no selected box has the same score as another live box (score ≥ ``min_score``) of its group (M×N comparisons;
   a sort of every group by ``TopK`` was tried first and cost 2.4 ms on 4 × 1000 boxes);
3. every box coordinate is finite with |c| ≤ 2⁴⁰, every box area is 0 or ≥ 2⁻⁵⁹, and 2⁻²⁰ ≤ N_t ≤ 1.

Why that is exact. Under 3, no float32 intermediate of onnxruntime's IoU of a pair whose IoU is within a factor 2
of N_t overflows or underflows (the intersection is ≥ N_t·union/2 ≥ 2⁻²⁰·2⁻⁶⁰), so each of its ~8 roundings has
relative error ≤ 2⁻²⁴; the union's cancellation is bounded (intersection ≤ each area, so union ≥ (area₁ + area₂)/2),
and the float32 IoU is within a relative 2⁻¹⁹ of the exact one, as is the float64 one. So "float32 IoU > N_t(1 +
2⁻¹⁶)" implies "float64 IoU > N_t", which implies "float32 IoU > N_t(1 − 2⁻¹⁶)": the suppression relations nest,
S_hi ⊆ S_64 ⊆ S_lo. Ties among boxes none of which is kept do not matter: each of them is suppressed by a box kept
at a higher score level, whatever their order among themselves, so by 2 (checked on the runs' common result) each
run equals greedy NMS that visits candidates by score and then lowest index. By induction over that order, with
the kept sets of the three equal so far: a candidate kept by the runs (1: both agree) has no kept box suppressing it
in S_lo ⊇ S_64, so float64 NMS keeps it; a candidate suppressed by the runs is suppressed in S_hi by a kept box, and
S_hi ⊆ S_64, so float64 NMS suppresses it. The cap (``max_output_boxes_per_class``) cuts all three after the same prefix. Scores: hard NMS
does not change them, so they are gathered from the input.

Live boxes are masked before NMS (scores below ``min_score`` → −∞, and the op's own threshold −∞, which drops
exactly those), so the op's strict ``score > threshold`` never meets ours (``score ≥ min_score``). Used only for
``center_point_box`` 0 (for 1, onnxruntime's float32 centre-to-corner conversion errs relative to the coordinates'
magnitude, not the box size), ``iou_offset`` 0 (the op has no +1 convention) and float32 scores (the op's type).
Otherwise, and whenever the check fails, the ``Loop`` runs.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

#: Relative margin of the two NonMaxSuppression thresholds (see the module docstring).
MARGIN = 2.0 ** -16
MAX_COORD, MIN_AREA, MIN_IOU = 2.0 ** 40, 2.0 ** -59, 2.0 ** -20


def applies(method: str, center_point_box: int, iou_offset: int, score_dtype: int) -> bool:
    """Whether the graph for these static settings tries ``NonMaxSuppression`` first."""
    return method == "hard" and center_point_box == 0 and iou_offset == 0 and score_dtype == TensorProto.FLOAT


def native_hard_graph(loop: onnx.GraphProto, prefix: str = "") -> onnx.GraphProto:
    """``loop`` (a hard Soft-NMS graph with the inputs and outputs of :mod:`passes.detect.onnx_nms`) behind an
    ``If`` whose other branch is ``NonMaxSuppression``'s result, taken when the run-time check holds."""
    from .onnx_nms import INPUT_NAMES, OUTPUT_NAMES, _Builder
    b = _Builder(f"{prefix}native/")
    boxes, scores, max_in, iou_in, score_in = INPUT_NAMES
    f32, f64, i64 = (lambda v, t=t: b.const(v, t) for t in (np.float32, np.float64, np.int64))

    def none(mask: str) -> str:  # no True value (also for an empty tensor); a float sum: onnxruntime's int64
        # ReduceSum is ~50× slower, and a sum of 0s and 1s is 0 only if every term is
        return b.op("Equal", [b.op("ReduceSum", [b.op("Cast", [mask], to=TensorProto.FLOAT)], keepdims=0), f32(0.0)])

    nt = b.op("Cast", [iou_in], to=TensorProto.DOUBLE)                                    # [1]
    nt_ok = b.op("And", [b.op("GreaterOrEqual", [nt, f64([MIN_IOU])]), b.op("LessOrEqual", [nt, f64([1.0])])])

    def threshold(factor: float) -> str:  # float32 in [0, 1]; 0.5 where N_t is out of range (not used then)
        t = b.op("Min", [b.op("Mul", [nt, f64([factor])]), f64([1.0])])
        return b.op("Cast", [b.op("Where", [nt_ok, t, f64([0.5])])], to=TensorProto.FLOAT)

    live = b.op("GreaterOrEqual", [scores, score_in])                                     # NaN scores: not live
    masked = b.op("Where", [live, scores, f32(-np.inf)])
    cap = b.op("Max", [max_in, i64([0])])
    runs = [b.op("NonMaxSuppression", [boxes, masked, cap, threshold(f), f32([-np.inf])], center_point_box=0)
            for f in (1.0 - MARGIN, 1.0 + MARGIN)]
    rows = [b.op("Slice", [b.op("Shape", [r]), i64([0]), i64([1])]) for r in runs]
    common = b.op("Min", rows)
    heads = [b.op("Slice", [r, i64([0]), common, i64([0])]) for r in runs]
    same = b.op("And", [b.op("Equal", [b.op("Squeeze", [rows[0], i64([0])]), b.op("Squeeze", [rows[1], i64([0])])]),
                        none(b.op("Not", [b.op("Equal", heads)]))])
    # no selected box shares its score with another live box of its group (−∞ = not live): (M, N) comparisons
    picked = b.op("Unsqueeze", [b.op("GatherND", [masked, runs[0]]), i64([1])])           # (M, 1)
    group_rows = b.op("GatherND", [masked, b.op("Slice", [runs[0], i64([0]), i64([2]), i64([1])])])  # (M, N)
    equal = b.op("ReduceSum", [b.op("Cast", [b.op("Equal", [group_rows, picked])], to=TensorProto.FLOAT),
                               i64([1])], keepdims=0)                    # ≥ 1 (the box itself); exact below 2^24
    no_ties = none(b.op("Greater", [equal, f32(1.5)]))
    # coordinates and areas (float64) in the range where float32 IoU errs by ≤ 2^-19 relative
    coords_ok = none(b.op("Not", [b.op("LessOrEqual", [b.op("Abs", [boxes]), f32(MAX_COORD)])]))  # NaN: not ok
    c64 = b.op("Cast", [boxes], to=TensorProto.DOUBLE)
    y1x1 = b.op("Slice", [c64, i64([0]), i64([2]), i64([2])])
    y2x2 = b.op("Slice", [c64, i64([2]), i64([4]), i64([2])])
    area = b.op("ReduceProd", [b.op("Abs", [b.op("Sub", [y2x2, y1x1])]), i64([2])], keepdims=0)   # (B, N)
    areas_ok = none(b.op("And", [b.op("Greater", [area, f64(0.0)]), b.op("Less", [area, f64(MIN_AREA)])]))
    ok = b.op("And", [b.op("And", [same, no_ties]), b.op("And", [b.op("And", [coords_ok, areas_ok]),
                                                                  b.op("Squeeze", [nt_ok, i64([0])])])])
    # then: the op's rows, scores gathered (hard NMS leaves them unchanged); else: the loop
    then_nodes = [helper.make_node("Identity", [runs[0]], [f"{prefix}native/then/indices"]),
                  helper.make_node("GatherND", [scores, runs[0]], [f"{prefix}native/then/scores"])]
    then_graph = helper.make_graph(then_nodes, "soft_nms_native", [], [
        helper.make_tensor_value_info(f"{prefix}native/then/indices", TensorProto.INT64, None),
        helper.make_tensor_value_info(f"{prefix}native/then/scores", TensorProto.FLOAT, None)])
    renamed = {out: f"{prefix}native/else/{out}" for out in OUTPUT_NAMES}
    else_nodes = list(loop.node)
    for node in else_nodes:
        node.output[:] = [renamed.get(o, o) for o in node.output]
    else_graph = helper.make_graph(else_nodes, "soft_nms_loop", [], [
        helper.make_tensor_value_info(renamed[o.name], o.type.tensor_type.elem_type, None) for o in loop.output])
    b.nodes.append(helper.make_node("If", [ok], list(OUTPUT_NAMES), name=f"{prefix}native",
                                    then_branch=then_graph, else_branch=else_graph))
    return helper.make_graph(b.nodes, "soft_nms", list(loop.input), list(loop.output))

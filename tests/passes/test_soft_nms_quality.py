"""The AP machinery of tools/bench/detection_eval.py on hand-made cases, and Soft-NMS above hard NMS on a fixed set of
random_shapes scenes (not timed: the benchmark, tools/bench/soft_nms.py, times it)."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("detection_eval"), importlib.import_module("soft_nms")
    finally:
        sys.path.remove(str(BENCH))


def test_voc_ap_on_a_hand_made_case(bench):
    ev, _ = bench
    gt = {0: np.array([[0, 0, 10, 10], [20, 0, 30, 10]], float)}
    dets = [(0, 0.9, np.array([0, 0, 10, 10.0])),     # TP (gt 0)
            (0, 0.8, np.array([0, 0, 10, 9.0])),      # duplicate of gt 0: FP
            (0, 0.7, np.array([21, 0, 30, 10.0])),    # TP (gt 1, IoU 0.9)
            (0, 0.6, np.array([50, 50, 60, 60.0])),   # FP
            (0, 0.5, np.array([24, 0, 34, 10.0]))]    # IoU 0.43 with gt 1 (< 0.5; and gt 1 is taken): FP
    # precision 1, 1/2, 2/3, 2/4, 2/5 at recall .5, .5, 1, 1, 1: envelope 1 up to recall .5, 2/3 up to 1
    assert ev.class_ap(dets, gt) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert ev.class_ap(dets[:1] + dets[2:3], gt) == pytest.approx(1.0)           # perfect
    assert ev.class_ap(dets[:1], gt) == pytest.approx(0.5)                        # half the objects found
    assert ev.class_ap(list(reversed(dets[:3])), gt) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)  # order is by score
    assert np.isnan(ev.class_ap(dets, {0: np.zeros((0, 4))}))


def test_interpolated_ap_is_the_envelope_of_precision(bench):
    """All-point interpolation ≥ the plain sum of precision × recall step, with equality when precision never
    rises; checked on random rankings."""
    ev, _ = bench
    rng = np.random.default_rng(0)
    for _ in range(200):
        hits = rng.random(30) < 0.5
        total = int(hits.sum()) + int(rng.integers(0, 4))
        if total == 0:
            continue
        ctp = np.cumsum(hits)
        recall, precision = ctp / total, ctp / np.arange(1, 31)
        plain = float(np.sum(np.diff(np.concatenate([[0], recall])) * precision))
        envelope = np.maximum.accumulate(precision[::-1])[::-1]
        interpolated = float(np.sum(np.diff(np.concatenate([[0], recall])) * envelope))
        assert ev.average_precision(recall, precision) == pytest.approx(interpolated)
        assert interpolated >= plain - 1e-12
    sorted_hits = np.array([1] * 5 + [0] * 5)
    ctp = np.cumsum(sorted_hits)
    assert ev.average_precision(ctp / 5, ctp / np.arange(1, 11)) == pytest.approx(1.0)


def test_boxes_of_random_shapes_are_xyxy_half_open(bench):
    """A rectangle's label box spans exactly the pixels it paints (rows r0..r1-1, columns c0..c1-1)."""
    from skimage.draw import random_shapes
    image, labels = random_shapes((64, 64), max_shapes=1, min_shapes=1, shape="rectangle", min_size=10,
                                  num_channels=1, rng=3)
    (_, ((r0, r1), (c0, c1))), = labels
    painted = np.argwhere(image[..., 0] < 255)
    assert (painted[:, 0].min(), painted[:, 0].max() + 1, painted[:, 1].min(), painted[:, 1].max() + 1) == (r0, r1, c0, c1)
    boxes, classes = bench[0].scene(3)
    assert boxes.shape[1] == 4 and np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])


def test_soft_nms_ap_above_hard_nms_on_fixed_scenes(bench):
    _, soft_nms_bench = bench
    rows, stats = soft_nms_bench.quality(40, seed=0)
    assert stats["same_class_gt_pairs_iou_gt_0.3"] > 10  # the scenes do have overlapping same-class objects
    ap = {(r["method"], r["iou_threshold"]): r["mAP50"] for r in rows}
    for nt in (0.3, 0.5):
        hard = ap[("onnxruntime NMS (hard)", nt)]
        assert ap[("soft-nms hard", nt)] == hard  # our hard sub-graph selects what onnxruntime's NMS selects
        assert ap[("soft-nms gaussian", nt)] > hard + 0.01
        assert ap[("soft-nms linear", nt)] >= hard
        for method in ("hard", "linear", "gaussian"):  # the multi-select Loop step selects the same boxes
            multi = next(r for r in rows if r["method"].startswith(f"soft-nms {method} multi-")
                         and r["iou_threshold"] == nt)
            assert multi["mAP50"] == ap[(f"soft-nms {method}", nt)]
            assert multi["boxes_kept_per_image"] == next(r["boxes_kept_per_image"] for r in rows if r["method"] ==
                                                         f"soft-nms {method}" and r["iou_threshold"] == nt)
    assert ap[("soft-nms linear", 0.3)] > ap[("onnxruntime NMS (hard)", 0.3)] + 0.01

"""Soft-NMS (passes.detect) against an independent plain-Python loop of Bodla's algorithm, in torch, in an exported
FX program and in onnxruntime; the spec's limit properties (§9.5); the ONNX NonMaxSuppression rewrite end to end.

Random box sets are drawn many per hypothesis example (a numpy generator seeded by hypothesis), so a few hundred
examples check thousands of sets. Coordinates are multiples of 1/4 and scores float32 values, so the float32 ONNX
inputs hold exactly the numbers the float64 reference sees.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

from passes.detect import SoftNMSConfig, append_soft_nms, batched_soft_nms, soft_nms, soft_nms_groups
from passes.detect.onnx_nms import soft_nms_model
from rewrite.cli import main

SETS = 12  # box sets per hypothesis example
FAST = settings(max_examples=100, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------------------------------------------
# The independent reference: Bodla's loop (cpu_soft_nms), on Python floats, with the documented selection rule
# (a box is selected only if its current score >= min_score; ties go to the lowest index).
# --------------------------------------------------------------------------------------------------------------
def ref_iou(a, b, offset):
    iw = min(a[2], b[2]) - max(a[0], b[0]) + offset
    if iw <= 0:
        return 0.0
    ih = min(a[3], b[3]) - max(a[1], b[1]) + offset
    if ih <= 0:
        return 0.0
    union = (a[2] - a[0] + offset) * (a[3] - a[1] + offset) + (b[2] - b[0] + offset) * (b[3] - b[1] + offset) - iw * ih
    return iw * ih / union if union > 0 else 0.0


def ref_soft_nms(boxes, scores, method="linear", sigma=0.5, nt=0.3, thr=0.001, max_det=100, offset=0,
                 convention="bodla"):
    boxes = [tuple(float(c) for c in b) for b in boxes]
    remaining = [(i, float(s)) for i, s in enumerate(scores) if float(s) >= thr]
    keep, kept = [], []
    while remaining and len(keep) < max_det:
        best = max(range(len(remaining)), key=lambda k: (remaining[k][1], -remaining[k][0]))
        i, s = remaining.pop(best)
        keep.append(i)
        kept.append(s)
        survivors = []
        for j, sj in remaining:
            o = ref_iou(boxes[i], boxes[j], offset)
            if method == "linear":
                sj = sj * (1.0 - o) if o > nt else sj
            elif method == "gaussian":
                if convention == "tf":
                    if o > nt:
                        continue
                    sj = sj * math.exp(-0.5 * o * o / sigma)
                else:
                    sj = sj * math.exp(-o * o / sigma)
            elif o > nt:
                continue
            if sj >= thr:
                survivors.append((j, sj))
        remaining = survivors
    return keep, kept


def ref_hard_nms(boxes, scores, nt):
    """Greedy NMS as torchvision.ops.nms defines it (offset 0, suppress IoU > nt, sorted by score)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    keep = []
    for i in order:
        if all(ref_iou(boxes[i], boxes[k], 0) <= nt for k in keep):
            keep.append(i)
    return keep


# --------------------------------------------------------------------------------------------------------------
def random_sets(seed, sets, n, integer=False):
    """``sets`` box sets of ``n`` boxes (xyxy, multiples of 1/4 or integers, clustered so they overlap) and float32
    scores (distinct)."""
    rng = np.random.default_rng(seed)
    centers = rng.integers(0, 4, size=(sets, n, 2)) * 12.0 + rng.integers(0, 24, size=(sets, n, 2)) / 4
    sizes = rng.integers(4, 64, size=(sets, n, 2)) / 4
    if integer:
        centers, sizes = np.round(centers), np.round(sizes)
    boxes = np.concatenate([centers, centers + sizes], -1)
    if n > 1:  # exact duplicates (IoU 1: linear decays them to 0, the edge of the >= min_score rule)
        dup = rng.random((sets, n)) < 0.15
        src = rng.integers(0, n, size=(sets, n))
        boxes = np.where(dup[..., None], np.take_along_axis(boxes, src[..., None].repeat(4, -1), 1), boxes)
    scores = rng.permutation(np.arange(1, sets * n + 1)).reshape(sets, n) / (sets * n + 1)
    scores = (scores * rng.uniform(0.2, 1.0, size=(sets, 1))).astype(np.float32)
    return boxes.astype(np.float32).astype(np.float64), scores.astype(np.float64)


configs = st.builds(
    lambda method, sigma, nt, thr, max_det, offset, convention: dict(
        method=method, sigma=sigma, iou_threshold=nt, min_score=thr, max_det=max_det, iou_offset=offset,
        sigma_convention=convention),
    st.sampled_from(["linear", "gaussian", "hard"]), st.sampled_from([0.1, 0.3, 0.5, 1.0, 2.0]),
    st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7, 1.0]), st.sampled_from([0.0, 0.001, 0.05, 0.3]),
    st.integers(0, 25), st.sampled_from([0, 1]), st.sampled_from(["bodla", "tf"]))


def ref_for(cfg, boxes, scores):
    return ref_soft_nms(boxes, scores, cfg["method"], cfg["sigma"], cfg["iou_threshold"], cfg["min_score"],
                        cfg["max_det"], cfg["iou_offset"], cfg["sigma_convention"])


def assert_same(keep, kept, ref_keep, ref_kept, what=""):
    assert list(map(int, keep)) == ref_keep, what
    np.testing.assert_allclose(np.asarray(kept, dtype=np.float64), np.asarray(ref_kept, dtype=np.float64),
                               rtol=0, atol=1e-6, err_msg=what)
    assert np.all(np.diff(np.asarray(kept, dtype=np.float64)) <= 0), "scores must be non-increasing"


# --------------------------------------------------------------------------------------------------------------
# torch
# --------------------------------------------------------------------------------------------------------------
@FAST
@given(cfg=configs, seed=st.integers(0, 2 ** 32 - 1), n=st.integers(0, 30), integer=st.booleans())
def test_torch_groups_equal_reference(cfg, seed, n, integer):
    boxes, scores = random_sets(seed, SETS, n, integer)
    tb, ts = torch.from_numpy(boxes), torch.from_numpy(scores)
    before = (tb.clone(), ts.clone())
    index, score, valid = soft_nms_groups(tb, ts, SoftNMSConfig(**cfg))
    assert torch.equal(tb, before[0]) and torch.equal(ts, before[1]), "inputs were modified"
    for g in range(SETS):
        v = valid[g].numpy()
        assert np.all(v[:v.sum()]) and not np.any(v[v.sum():]), "valid picks must be a prefix"
        assert_same(index[g][valid[g]].numpy(), score[g][valid[g]].numpy(), *ref_for(cfg, boxes[g], scores[g]),
                    f"set {g}")


@FAST
@given(cfg=configs, seed=st.integers(0, 2 ** 32 - 1), n=st.integers(1, 30), classes=st.integers(1, 4))
def test_batched_class_offsets_equal_per_class_reference(cfg, seed, n, classes):
    boxes, scores = random_sets(seed, 1, n)
    labels = np.random.default_rng(seed).integers(0, classes, size=n)
    keep, kept = batched_soft_nms(torch.from_numpy(boxes[0]), torch.from_numpy(scores[0]), torch.from_numpy(labels),
                                  SoftNMSConfig(**cfg))
    merged = []
    for c in range(classes):
        members = np.flatnonzero(labels == c)
        k, s = ref_for({**cfg, "max_det": 10 ** 6}, boxes[0][members], scores[0][members])
        merged += [(sc, int(members[i])) for i, sc in zip(k, s)]
    merged.sort(key=lambda t: (-t[0], t[1]))
    merged = merged[:cfg["max_det"]]
    assert_same(keep.numpy(), kept.numpy(), [i for _, i in merged], [s for s, _ in merged])


# --------------------------------------------------------------------------------------------------------------
# the exported FX program (one export per method; box count dynamic)
# --------------------------------------------------------------------------------------------------------------
FX_CONFIGS = {
    "linear": dict(method="linear", iou_threshold=0.3, min_score=0.01, max_det=12, iou_offset=1),
    "gaussian": dict(method="gaussian", sigma=0.5, min_score=0.001, max_det=12),
    "gaussian-tf": dict(method="gaussian", sigma=0.25, iou_threshold=0.6, min_score=0.001, max_det=12,
                        sigma_convention="tf"),
    "hard": dict(method="hard", iou_threshold=0.5, min_score=0.0, max_det=12),
}


class _Groups(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = SoftNMSConfig(**cfg)

    def forward(self, boxes, scores):
        return soft_nms_groups(boxes, scores, self.cfg)


@functools.lru_cache(maxsize=None)
def exported(name):
    boxes, scores = random_sets(0, 3, 20)
    n = torch.export.Dim("n", min=2, max=64)
    return torch.export.export(_Groups(FX_CONFIGS[name]), (torch.from_numpy(boxes), torch.from_numpy(scores)),
                               dynamic_shapes=({1: n}, {1: n})).module()


@pytest.mark.parametrize("name", sorted(FX_CONFIGS))
@settings(max_examples=15, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2 ** 32 - 1), n=st.integers(2, 30))
def test_exported_program_equals_reference(name, seed, n):
    cfg = {"sigma": 0.5, "iou_threshold": 0.3, "iou_offset": 0, "sigma_convention": "bodla", **FX_CONFIGS[name]}
    boxes, scores = random_sets(seed, 3, n)
    index, score, valid = exported(name)(torch.from_numpy(boxes), torch.from_numpy(scores))
    for g in range(3):
        assert_same(index[g][valid[g]].numpy(), score[g][valid[g]].numpy(), *ref_for(cfg, boxes[g], scores[g]))


def test_append_soft_nms_adds_two_outputs_to_a_program():
    class Detector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.box = torch.nn.Linear(5, 4)
            self.cls = torch.nn.Linear(5, 1)

        def forward(self, x):
            raw = self.box(x)
            boxes = torch.cat([raw[:, :2], raw[:, :2] + raw[:, 2:].abs() + 0.5], 1) * 10
            return boxes, torch.sigmoid(self.cls(x))[:, 0]

    torch.manual_seed(0)
    x = torch.randn(40, 5)
    program = torch.export.export(Detector().eval(), (x,))
    out = append_soft_nms(program, method="gaussian", sigma=0.5, max_det=15, min_score=0.01)
    with torch.no_grad():
        boxes, scores, keep, kept = out.module()(x)
    ref_keep, ref_kept = ref_soft_nms(boxes.detach().double().numpy(), scores.detach().double().numpy(), "gaussian",
                                      0.5, 0.3, 0.01, 15)
    assert len(ref_keep) > 5
    assert_same(keep.numpy(), kept.numpy(), ref_keep, ref_kept)
    with pytest.raises(Exception, match="scores"):
        append_soft_nms(program, boxes=0, scores=0)


def test_append_soft_nms_per_class_via_labels():
    class Detector(torch.nn.Module):
        def forward(self, x):
            boxes = torch.cat([x[:, :2] * 20, x[:, :2] * 20 + x[:, 2:4].abs() * 10 + 1], 1)
            return boxes, torch.sigmoid(x[:, 4]), (x[:, 5].abs() * 3).long().clamp(max=2)

    torch.manual_seed(1)
    x = torch.randn(40, 6, dtype=torch.float64)
    program = torch.export.export(Detector(), (x,))
    out = append_soft_nms(program, labels=2, method="linear", iou_threshold=0.2, max_det=25, min_score=0.01)
    boxes, scores, labels, keep, kept = out.module()(x)
    merged = []
    for c in range(3):
        members = np.flatnonzero(labels.numpy() == c)
        k, s = ref_soft_nms(boxes.numpy()[members], scores.numpy()[members], "linear", 0.5, 0.2, 0.01, 10 ** 6)
        merged += [(sc, int(members[i])) for i, sc in zip(k, s)]
    merged = sorted(merged, key=lambda t: (-t[0], t[1]))[:25]
    assert len(set(labels.numpy()[keep.numpy()])) == 3
    assert_same(keep.numpy(), kept.numpy(), [i for _, i in merged], [s for s, _ in merged])


# --------------------------------------------------------------------------------------------------------------
# the ONNX sub-graph in onnxruntime
# --------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def session(method, sigma, convention, offset, layout, matrix, window=None, steps=None, isolate=None):
    cfg = SoftNMSConfig(method=method, sigma=sigma, sigma_convention=convention, iou_offset=offset)
    return ort.InferenceSession(soft_nms_model(cfg, layout, matrix=matrix, window=window, steps=steps,
                                               isolate=isolate).SerializeToString(),
                                providers=["CPUExecutionProvider"])


def to_layout(boxes_xyxy, layout, rng):
    x1, y1, x2, y2 = np.moveaxis(boxes_xyxy, -1, 0)
    if layout == 1:
        return np.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1)
    flip = rng.random(x1.shape) < 0.3  # ONNX allows either diagonal pair
    return np.stack([np.where(flip, y2, y1), np.where(flip, x2, x1), np.where(flip, y1, y2), np.where(flip, x1, x2)],
                    -1)


def run_onnx(cfg, boxes_bn, scores_bcn, layout, rng, matrix=True, window=None, steps=None, isolate=None):
    """Our sub-graph in onnxruntime (``matrix``: precomputed weight matrix, else IoU rows in the loop; ``window``:
    0 one pick per Loop iteration, None the default multi-select step; ``steps``: picks per one-pick iteration;
    ``isolate``: isolated boxes outside the one-pick loop)."""
    sess = session(cfg["method"], cfg["sigma"], cfg["sigma_convention"], cfg["iou_offset"], layout, matrix, window,
                   steps, isolate)
    feeds = {"boxes": to_layout(boxes_bn, layout, rng).astype(np.float32), "scores": scores_bcn.astype(np.float32),
             "max_output_boxes_per_class": np.array([cfg["max_det"]], np.int64),
             "iou_threshold": np.array([cfg["iou_threshold"]], np.float32),
             "score_threshold": np.array([cfg["min_score"]], np.float32)}
    copies = {k: v.copy() for k, v in feeds.items()}
    sel, sc = sess.run(None, feeds)
    assert all(np.array_equal(copies[k], feeds[k]) for k in feeds), "inputs were modified"
    return sel, sc


def ref_onnx(cfg, boxes_bn, scores_bcn):
    rows, kept = [], []
    for b in range(scores_bcn.shape[0]):
        for c in range(scores_bcn.shape[1]):
            k, s = ref_for(cfg, boxes_bn[b], scores_bcn[b, c])
            rows += [(b, c, i) for i in k]
            kept += s
    return rows, kept


@settings(FAST, max_examples=200)
@given(cfg=configs, seed=st.integers(0, 2 ** 32 - 1), n=st.integers(0, 30), layout=st.sampled_from([0, 1]),
       batch=st.integers(1, 3), classes=st.integers(1, 4), matrix=st.sampled_from([True, False, None]),
       window=st.sampled_from([0, None]), steps=st.sampled_from([1, 3, None]), isolate=st.booleans())
def test_onnx_subgraph_equals_reference(cfg, seed, n, layout, batch, classes, matrix, window, steps, isolate):
    cfg = {**cfg, "iou_threshold": float(np.float32(cfg["iou_threshold"])), "min_score": float(np.float32(cfg["min_score"]))}
    boxes, _ = random_sets(seed, batch, n)
    _, scores = random_sets(seed + 1, batch * classes, n)
    scores = scores.reshape(batch, classes, n)
    rng = np.random.default_rng(seed)
    sel, sc = run_onnx(cfg, boxes, scores, layout, rng, matrix, window, steps, isolate)
    rows, kept = ref_onnx(cfg, boxes, scores)
    assert sel.dtype == np.int64 and sel.shape == (len(rows), 3)
    assert [tuple(r) for r in sel.tolist()] == rows
    np.testing.assert_allclose(sc.astype(np.float64), kept, rtol=1e-6, atol=1e-6)  # float32 output


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2 ** 32 - 1), n=st.integers(0, 40), layout=st.sampled_from([0, 1]),
       nt=st.sampled_from([0.0, 0.3, 0.5, 0.7]), thr=st.sampled_from([0.0, 0.2]), max_det=st.integers(0, 50),
       matrix=st.booleans(), window=st.sampled_from([0, None]))
def test_onnx_hard_equals_onnxruntime_nonmaxsuppression(seed, n, layout, nt, thr, max_det, matrix, window):
    """Our ``hard`` sub-graph selects what onnxruntime's own NonMaxSuppression selects (scores are distinct and
    never exactly at the threshold, where ≥ and > would differ)."""
    boxes, _ = random_sets(seed, 2, n)
    _, scores = random_sets(seed + 7, 6, n)
    scores = scores.reshape(2, 3, n)
    rng = np.random.default_rng(seed)
    cfg = dict(method="hard", sigma=0.5, sigma_convention="bodla", iou_offset=0, max_det=max_det,
               iou_threshold=nt, min_score=thr)
    sel, sc = run_onnx(cfg, boxes, scores, layout, rng, matrix, window)
    rng = np.random.default_rng(seed)
    expected = _ort_nms_session(layout).run(None, {
        "b": to_layout(boxes, layout, rng).astype(np.float32), "s": scores.astype(np.float32),
        "m": np.array([max_det], np.int64), "i": np.array([nt], np.float32), "t": np.array([thr], np.float32)})[0]
    assert sel.tolist() == expected.reshape(-1, 3).tolist()
    picked = scores[sel[:, 0], sel[:, 1], sel[:, 2]] if len(sel) else np.zeros(0)
    np.testing.assert_allclose(sc, picked, rtol=0, atol=1e-7)  # hard NMS does not decay


def _ort_nms_session(layout=0):
    node = helper.make_node("NonMaxSuppression", ["b", "s", "m", "i", "t"], ["o"], center_point_box=layout)
    graph = helper.make_graph([node], "nms", [helper.make_tensor_value_info(x, t, None) for x, t in
                                              zip("bsmit", [1, 1, 7, 1, 1])],
                              [helper.make_tensor_value_info("o", TensorProto.INT64, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("method", ["linear", "gaussian", "hard"])
@pytest.mark.parametrize("form", [(True, 0), (False, 0), (None, 0), (True, 8), (False, 8), (True, 0, 1, True),
                                  (None, 0, 3, True)])
@pytest.mark.parametrize("shape", [(1, 0, 5), (2, 0, 0), (0, 3, 5), (2, 3, 0), (0, 0, 0)])
def test_empty_batch_class_or_box_axes_give_empty_outputs_like_onnxruntime(method, form, shape):
    """0 classes (once an integer division / modulo by zero in the multi-select step), 0 images or 0 boxes: both
    outputs are empty with the dtypes and ranks onnxruntime's own NonMaxSuppression gives (int64 (0, 3))."""
    batch, classes, n = shape
    matrix, window, steps, isolate = (*form, None, None)[:4]
    rng = np.random.default_rng(0)
    boxes = rng.uniform(0, 10, (batch, n, 4)).astype(np.float32)
    scores = rng.uniform(0.2, 1.0, (batch, classes, n)).astype(np.float32)
    params = (np.array([5], np.int64), np.array([0.5], np.float32), np.array([0.1], np.float32))
    expected = _ort_nms_session().run(None, dict(zip("bsmit", (boxes, scores, *params))))[0]
    sess = session(method, 0.5, "bodla", 0, 0, matrix, window, steps, isolate)
    sel, sc = sess.run(None, dict(zip(("boxes", "scores", "max_output_boxes_per_class", "iou_threshold",
                                        "score_threshold"), (boxes, scores, *params))))
    assert expected.shape == (0, 3) and expected.dtype == np.int64
    assert sel.shape == expected.shape and sel.dtype == expected.dtype
    assert sc.shape == (0,) and sc.dtype == np.float32


# --------------------------------------------------------------------------------------------------------------
# hard: onnxruntime's NonMaxSuppression where a run-time check proves it equal to ours, the Loop otherwise
# --------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def native_session(matrix, window):
    """The hard graph with the ``If``'s condition (True: NonMaxSuppression's result was taken) as a last output (a
    test-only wrapper)."""
    model = soft_nms_model(SoftNMSConfig(method="hard"), 0, matrix=matrix, window=window)
    branch = next(n for n in model.graph.node if n.op_type == "If" and n.name.endswith("native"))
    model.graph.output.append(helper.make_tensor_value_info(branch.input[0], TensorProto.BOOL, None))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def run_native(boxes_xyxy, scores, nt, thr, max_det, matrix=True, window=0):
    boxes_xyxy = boxes_xyxy.astype(np.float32).astype(np.float64)   # what the float32 graph inputs hold
    scores = scores.astype(np.float32).astype(np.float64)
    feeds = {"boxes": boxes_xyxy[..., [1, 0, 3, 2]].astype(np.float32), "scores": scores.astype(np.float32),
             "max_output_boxes_per_class": np.array([max_det], np.int64),
             "iou_threshold": np.array([nt], np.float32), "score_threshold": np.array([thr], np.float32)}
    sel, sc, took = native_session(matrix, window).run(None, feeds)
    cfg = dict(method="hard", sigma=0.5, iou_threshold=float(np.float32(nt)), min_score=float(np.float32(thr)),
               max_det=max_det, iou_offset=0, sigma_convention="bodla")
    rows, kept = ref_onnx(cfg, boxes_xyxy, scores)
    assert [tuple(r) for r in sel.tolist()] == rows
    np.testing.assert_array_equal(sc.astype(np.float64), np.asarray(kept, np.float64).reshape(-1))
    ort_rows = _ort_nms_session().run(None, dict(zip("bsmit", (feeds["boxes"], feeds["scores"],
                                                                feeds["max_output_boxes_per_class"],
                                                                feeds["iou_threshold"],
                                                                np.array([np.nextafter(np.float32(thr), -np.inf)],
                                                                         np.float32)))))[0]
    return bool(took), [tuple(r) for r in ort_rows.tolist()] == rows


@pytest.mark.parametrize("form", [(True, 0), (False, 0), (None, 0), (True, 8), (False, 8)])
@pytest.mark.parametrize("seed", range(6))
def test_hard_takes_nonmaxsuppression_on_distinct_scores(form, seed):
    """Distinct scores, N_t 0.3 / 0.5: the check passes, the op's result is taken, and it equals the reference."""
    boxes, _ = random_sets(seed, 2, 30)
    _, scores = random_sets(seed + 1, 6, 30)
    for nt, thr, cap in ((0.3, 0.0, 25), (0.5, 0.2, 4)):
        took, same_as_op = run_native(boxes, scores.reshape(2, 3, 30), nt, thr, cap, *form)
        assert took and same_as_op


@pytest.mark.parametrize("form", [(True, 0), (False, 8)])
def test_hard_falls_back_to_the_loop_where_nonmaxsuppression_is_not_proven(form):
    """Each condition of passes.detect.onnx_native sends the input to the Loop, whose result equals the reference:
    a float32-IoU borderline pair (onnxruntime's own NMS keeps both boxes, the float64 reference suppresses one),
    a selected box tied with another live box, N_t = 0, a coordinate beyond 2^40, a box of area 2^-70."""
    w, dx = 2423384.0, 1304899.0   # IoU (w - dx) / (w + dx) = 0.30000003 > float32(0.3); float32 rounds it to 0.3
    pair = np.array([[[0, 0, w, 1], [dx, 0, dx + w, 1]]])
    took, same_as_op = run_native(pair, np.array([[[0.9, 0.8]]]), 0.3, 0.0, 10, *form)
    assert not took and not same_as_op
    boxes, _ = random_sets(3, 1, 20)
    _, scores = random_sets(4, 1, 20)
    top = int(np.argmax(scores[0]))
    tied = scores.copy()
    tied[0, (top + 1) % 20] = tied[0, top]   # the first pick ties with another live box
    assert run_native(boxes, tied[None], 0.3, 0.0, 10, *form)[0] is False
    assert run_native(boxes, scores[None], 0.0, 0.0, 10, *form)[0] is False
    far = boxes.copy()
    far[0, 5] += 2.0 ** 41
    assert run_native(far, scores[None], 0.3, 0.0, 10, *form)[0] is False
    tiny = boxes.copy()
    tiny[0, 5] = [0.0, 0.0, 2.0 ** -35, 2.0 ** -35]
    assert run_native(tiny, scores[None], 0.3, 0.0, 10, *form)[0] is False
    assert run_native(boxes, scores[None], 0.3, 0.0, 10, *form)[0] is True   # the same input, unchanged: taken


def test_nonmaxsuppression_is_used_only_for_hard_corner_boxes_offset_zero():
    def ops(method, layout=0, offset=0, dtype=TensorProto.FLOAT):
        model = soft_nms_model(SoftNMSConfig(method=method, iou_offset=offset), layout, dtype, window=0)
        found = []

        def walk(graph):
            for node in graph.node:
                found.append(node.op_type)
                for attr in node.attribute:
                    if attr.type == onnx.AttributeProto.GRAPH:
                        walk(attr.g)
        walk(model.graph)
        return found.count("NonMaxSuppression"), found.count("Loop")
    assert ops("hard") == (2, 1)
    assert ops("hard", layout=1) == ops("hard", offset=1) == ops("hard", dtype=TensorProto.DOUBLE) == (0, 1)
    assert ops("linear")[0] == ops("gaussian")[0] == 0


# --------------------------------------------------------------------------------------------------------------
# limit properties (spec §9.5)
# --------------------------------------------------------------------------------------------------------------
def clustered(seed, n_clusters=5, per_cluster=6):
    """Boxes whose pairwise IoU is 0 (different clusters) or >= 0.05 (same cluster), distinct scores."""
    rng = np.random.default_rng(seed)
    boxes = []
    for c in range(n_clusters):
        base = np.array([c * 100.0, c * 50.0])
        for _ in range(per_cluster):
            xy = base + rng.integers(0, 8, 2)
            boxes.append([*xy, *(xy + 20 + rng.integers(0, 8, 2))])
    boxes = np.array(boxes, np.float64)
    ious = [ref_iou(a, b, 0) for a in boxes for b in boxes]
    assert all(o == 0 or o >= 0.05 for o in ious)
    return boxes, rng.permutation(len(boxes)) / len(boxes) + 0.01


@pytest.mark.parametrize("seed", range(20))
def test_gaussian_sigma_to_zero_is_hard_nms_with_zero_threshold(seed):
    boxes, scores = clustered(seed)
    keep, kept = soft_nms(torch.from_numpy(boxes), torch.from_numpy(scores), method="gaussian", sigma=1e-6,
                          min_score=0.001, max_det=1000)
    expected = ref_hard_nms(boxes, scores, 0.0)
    assert keep.tolist() == expected and len(expected) == 5
    np.testing.assert_array_equal(kept.numpy(), scores[expected])


@pytest.mark.parametrize("seed", range(20))
def test_linear_with_nt_one_decays_nothing(seed):
    boxes, scores = random_sets(seed, 1, 40)
    keep, kept = soft_nms(torch.from_numpy(boxes[0]), torch.from_numpy(scores[0]), method="linear",
                          iou_threshold=1.0, min_score=0.2, max_det=1000)
    expected = [i for i in np.argsort(-scores[0], kind="stable") if scores[0][i] >= 0.2]
    assert keep.tolist() == expected
    np.testing.assert_array_equal(kept.numpy(), scores[0][expected])


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("nt", [0.0, 0.3, 0.5, 0.8])
def test_hard_offset_zero_is_greedy_nms(seed, nt):
    boxes, scores = random_sets(seed, 1, 40, integer=bool(seed % 2))
    keep, kept = soft_nms(torch.from_numpy(boxes[0]), torch.from_numpy(scores[0]), method="hard",
                          iou_threshold=nt, min_score=0.0, max_det=1000)
    assert keep.tolist() == ref_hard_nms(boxes[0], scores[0], nt)
    np.testing.assert_array_equal(kept.numpy(), scores[0][keep.numpy()])


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("sigma", [0.1, 0.5, 2.0])
def test_tf_convention_half_sigma_equals_bodla(seed, sigma):
    boxes, scores = random_sets(seed, 1, 40)
    b, s = torch.from_numpy(boxes[0]), torch.from_numpy(scores[0])
    k1, s1 = soft_nms(b, s, method="gaussian", sigma=sigma, max_det=1000)
    k2, s2 = soft_nms(b, s, method="gaussian", sigma=sigma / 2, sigma_convention="tf", iou_threshold=1.0,
                      max_det=1000)
    assert k1.tolist() == k2.tolist() and len(k1) > 10
    np.testing.assert_allclose(s1.numpy(), s2.numpy(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", ["torch", "onnx", "onnx-rows"])
def test_threshold_edges_keep_scores_equal_to_min_score(backend):
    """A score equal to min_score is kept (>=), a duplicate box decays to exactly 0 under linear and is kept at
    min_score 0, and an IoU equal to N_t does not trigger the gate (strict >)."""
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [20, 0, 30, 10], [25, 0, 35, 10], [40, 0, 50, 10]], np.float64)
    scores = np.array([0.75, 0.5, 0.625, 0.5, 0.25])
    iou = 50 / 150
    for thr, nt, expected_keep, expected_scores in (
            (0.0, 0.3, [0, 2, 3, 4, 1], [0.75, 0.625, 0.5 * (1 - iou), 0.25, 0.0]),
            (0.25, 0.3, [0, 2, 3, 4], [0.75, 0.625, 0.5 * (1 - iou), 0.25]),
            (0.0, iou, [0, 2, 3, 4, 1], [0.75, 0.625, 0.5, 0.25, 0.0])):
        cfg = dict(method="linear", sigma=0.5, iou_threshold=nt, min_score=thr, max_det=10, iou_offset=0,
                   sigma_convention="bodla")
        assert ref_for(cfg, boxes, scores) == (expected_keep, pytest.approx(expected_scores, abs=1e-12))
        if backend == "torch":
            keep, kept = soft_nms(torch.from_numpy(boxes), torch.from_numpy(scores), SoftNMSConfig(**cfg))
            keep, kept = keep.tolist(), kept.tolist()
        else:
            sel, sc = run_onnx({**cfg, "iou_threshold": float(np.float32(nt))}, boxes[None], scores[None, None], 0,
                               np.random.default_rng(0), matrix=backend == "onnx")
            keep, kept = sel[:, 2].tolist(), sc.tolist()  # N_t as float32(1/3) > 1/3: the gate stays shut too
        assert keep == expected_keep
        assert kept == pytest.approx(expected_scores, abs=1e-6)


def test_iou_offset_changes_integer_boxes_as_documented():
    """Two 10×10 integer boxes sharing a 5-pixel edge band: offset 0 IoU 50/150, offset 1 IoU 66/176 (Bodla)."""
    boxes = torch.tensor([[0.0, 0, 10, 10], [5, 0, 15, 10]], dtype=torch.float64)
    scores = torch.tensor([0.9, 0.8], dtype=torch.float64)
    for offset, iou in ((0, 50 / 150), (1, 66 / 176)):
        _, kept = soft_nms(boxes, scores, method="linear", iou_threshold=0.0, iou_offset=offset)
        assert kept.tolist() == pytest.approx([0.9, 0.8 * (1 - iou)], abs=1e-12)


# --------------------------------------------------------------------------------------------------------------
# the pass: an ONNX detector with NonMaxSuppression, rewritten by `softswap convert --soft-nms ...`
# --------------------------------------------------------------------------------------------------------------
N_BOXES, FEATURES, CLASSES, BATCH = 48, 6, 3, 2


def detector(path, layout, runtime_params=False, with_reader=False, opset=13, dynamic=False):
    """A tiny detector head: boxes and class scores from features, then NonMaxSuppression (outputs: boxes, scores,
    selected_indices; with_reader: also the scores a Gather reads through selected_indices)."""
    rng = np.random.default_rng(layout)
    wb = rng.normal(size=(FEATURES, 4)).astype(np.float32)
    wc = rng.normal(size=(FEATURES, CLASSES)).astype(np.float32)
    lift = np.array([0, 0, 1, 1], np.float32) if layout == 0 else np.array([0, 0, 1, 1], np.float32)
    nodes = [helper.make_node("MatMul", ["x", "wb"], ["raw"]), helper.make_node("Abs", ["raw"], ["absraw"]),
             helper.make_node("Mul", ["absraw", "scale"], ["scaled"]),
             helper.make_node("Add", ["scaled", "lift"], ["boxes"]),
             helper.make_node("MatMul", ["x", "wc"], ["logits"]), helper.make_node("Sigmoid", ["logits"], ["probs"]),
             helper.make_node("Transpose", ["probs"], ["scores"], perm=[0, 2, 1])]
    inits = [numpy_helper.from_array(wb, "wb"), numpy_helper.from_array(wc, "wc"),
             numpy_helper.from_array(np.array([4, 4, 8, 8], np.float32), "scale"), numpy_helper.from_array(lift, "lift")]
    n_dim = "N" if dynamic else N_BOXES  # a box count unknown when converting: the form is chosen at run time
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [BATCH, n_dim, FEATURES])]
    params = [("max_out", np.array([10], np.int64)), ("iou_thr", np.array([0.4], np.float32)),
              ("score_thr", np.array([0.05], np.float32))]
    for name, value in params:
        if runtime_params:
            inputs.append(helper.make_tensor_value_info(name, TensorProto.INT64 if value.dtype == np.int64 else
                                                        TensorProto.FLOAT, [1]))
        else:
            inits.append(numpy_helper.from_array(value, name))
    nodes.append(helper.make_node("NonMaxSuppression", ["boxes", "scores", "max_out", "iou_thr", "score_thr"],
                                  ["selected_indices"], center_point_box=layout, name="nms"))
    outputs = [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [BATCH, n_dim, 4]),
               helper.make_tensor_value_info("scores", TensorProto.FLOAT, [BATCH, CLASSES, n_dim]),
               helper.make_tensor_value_info("selected_indices", TensorProto.INT64, ["M", 3])]
    if with_reader:
        nodes.append(helper.make_node("GatherND", ["scores", "selected_indices"], ["picked"]))
        outputs.append(helper.make_tensor_value_info("picked", TensorProto.FLOAT, ["M"]))
    model = helper.make_model(helper.make_graph(nodes, "detector", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return {name: value for name, value in params}


def xyxy_from(boxes, layout):
    if layout == 1:
        xc, yc, w, h = np.moveaxis(boxes, -1, 0)
        return np.stack([xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2], -1)
    y1, x1, y2, x2 = np.moveaxis(boxes, -1, 0)
    return np.stack([np.minimum(x1, x2), np.minimum(y1, y2), np.maximum(x1, x2), np.maximum(y1, y2)], -1)


@pytest.mark.parametrize("layout,method,runtime,dynamic,opset", [
    (0, "linear", False, False, 13), (1, "gaussian", False, False, 13), (0, "hard", True, False, 18),
    (1, "linear", True, True, 13), (0, "gaussian", False, True, 21)])
def test_convert_rewrites_nonmaxsuppression_end_to_end(tmp_path, capsys, layout, method, runtime, dynamic, opset):
    src, out = tmp_path / "det.onnx", tmp_path / "soft.onnx"
    params = detector(src, layout, runtime_params=runtime, with_reader=(method == "linear"), dynamic=dynamic,
                      opset=opset)
    assert main(["inspect", str(src), "--json"]) == 0
    import json
    inspected = json.loads(capsys.readouterr().out)
    assert [s["node"] for s in inspected["nms_sites"]] == ["nms"]
    assert inspected["nms_sites"][0]["box_layout"] == ("yxyx" if layout == 0 else "cxcywh")
    extra = ["--option", "sigma=0.3"] if method == "gaussian" else []
    assert main(["convert", str(src), "-o", str(out), "--soft-nms", method, *extra, "--json", *(["--no-verify"] if runtime else [])]) == 0
    report = json.loads(capsys.readouterr().out)
    site = report["passes"][0]["sites"][0]
    assert site["status"] == "replaced" and site["scores_output"] == "selected_indices_scores"
    assert site["form"] == ("run-time choice (weight matrix when N <= 256, else IoU rows)" if dynamic
                            else "weight matrix")
    rewritten = onnx.load(out)
    inserted = [n.name for n in rewritten.graph.node if n.op_type == "NonMaxSuppression"]
    assert "nms" not in inserted and len(inserted) == (2 if (method, layout) == ("hard", 0) else 0)
    assert all(n.startswith("softswap/") for n in inserted)  # hard: the op, behind its run-time check
    assert site["native_nms"] == bool(inserted)
    assert main(["inspect", str(out), "--json"]) == 0      # ... which inspect does not list as a site
    assert json.loads(capsys.readouterr().out)["nms_sites"] == []
    assert [o.name for o in rewritten.graph.output][-1] == "selected_indices_scores"
    if not runtime:
        assert report["fidelity"]["changed_outputs"] == ["selected_indices"]
        assert report["fidelity"]["added_outputs"][-1] == "selected_indices_scores"
    feeds = {"x": np.random.default_rng(3).normal(size=(BATCH, N_BOXES, FEATURES)).astype(np.float32)}
    if runtime:
        feeds.update(params)
    names = [o.name for o in rewritten.graph.output]
    got = dict(zip(names, ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)))
    cfg = dict(method=method, sigma=0.3 if method == "gaussian" else 0.5, iou_threshold=float(np.float32(0.4)),
               min_score=float(np.float32(0.05)), max_det=10, iou_offset=0, sigma_convention="bodla")
    rows, kept = ref_onnx(cfg, xyxy_from(got["boxes"].astype(np.float64), layout), got["scores"].astype(np.float64))
    assert len(rows) > BATCH * CLASSES
    assert [tuple(r) for r in got["selected_indices"].tolist()] == rows
    np.testing.assert_allclose(got["selected_indices_scores"], kept, rtol=1e-6, atol=1e-6)
    if "picked" in got:  # a node reading selected_indices keeps working (it sees the undecayed scores)
        np.testing.assert_array_equal(got["picked"], got["scores"][tuple(got["selected_indices"].T)])


def test_options_override_the_node(tmp_path, capsys):
    src, out = tmp_path / "det.onnx", tmp_path / "soft.onnx"
    detector(src, 0)
    assert main(["convert", str(src), "-o", str(out), "--soft-nms", "linear", "--option", "iou=0.6",
                 "--option", "score_threshold=0.2", "--option", "max_det=4", "--option", "iou_offset=1", "--json"]) == 0
    import json
    site = json.loads(capsys.readouterr().out)["passes"][0]["sites"][0]
    assert site["options"]["iou"] == 0.6 and site["options"]["max_det"] == 4
    assert site["sources"] == {"iou": "option", "score_threshold": "option", "max_det": "option"}
    feeds = {"x": np.random.default_rng(5).normal(size=(BATCH, N_BOXES, FEATURES)).astype(np.float32)}
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    cfg = dict(method="linear", sigma=0.5, iou_threshold=float(np.float32(0.6)), min_score=float(np.float32(0.2)),
               max_det=4, iou_offset=1, sigma_convention="bodla")
    rows, kept = ref_onnx(cfg, xyxy_from(got["boxes"].astype(np.float64), 0), got["scores"].astype(np.float64))
    assert [tuple(r) for r in got["selected_indices"].tolist()] == rows
    np.testing.assert_allclose(got["selected_indices_scores"], kept, rtol=1e-6, atol=1e-6)


def _no_nms_model(path):
    node = helper.make_node("Relu", ["x"], ["y"])
    model = helper.make_model(helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [2, 3])],
                                                [helper.make_tensor_value_info("y", 1, [2, 3])]),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, path)


@pytest.mark.parametrize("case,args,message", [
    ("no-nms", ["--soft-nms", "linear"], "NonMaxSuppression"),
    ("bad-method", ["--soft-nms", "cubic"], "method"),
    ("bad-sigma", ["--soft-nms", "gaussian", "--option", "sigma=0"], "sigma"),
    ("nan-sigma", ["--soft-nms", "gaussian", "--option", "sigma=nan"], "sigma"),
    ("bad-iou", ["--soft-nms", "linear", "--option", "iou=1.5"], "iou"),
    ("bad-offset", ["--soft-nms", "linear", "--option", "iou_offset=2"], "iou_offset"),
    ("bad-max-det", ["--soft-nms", "linear", "--option", "max_det=-1"], "max_det"),
    ("not-a-number", ["--soft-nms", "linear", "--option", "score_threshold=high"], "score_threshold"),
    ("unknown", ["--soft-nms", "linear", "--option", "temperature=2"], "temperature"),
    ("convention", ["--soft-nms", "gaussian", "--option", "sigma_convention=keras"], "sigma_convention"),
])
def test_bad_input_is_one_line_exit_two_nothing_written(tmp_path, capsys, case, args, message):
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    (_no_nms_model if case == "no-nms" else lambda p: detector(p, 0))(src)
    assert main(["convert", str(src), "-o", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("softswap: error:")
    assert not out.exists()


@pytest.mark.parametrize("params,message", [
    (dict(method="cubic"), "method"), (dict(sigma=0.0), "sigma"), (dict(sigma=math.inf), "sigma"),
    (dict(iou_threshold=1.5), "iou"), (dict(iou_threshold=-0.1), "iou"), (dict(iou_offset=2), "iou_offset"),
    (dict(max_det=-1), "max_det"), (dict(sigma_convention="keras"), "sigma_convention"),
    (dict(min_score=math.nan), "score_threshold"),
])
def test_config_checks_what_the_options_check(params, message):
    """SoftNMSConfig (the API path) refuses what the pass options refuse, with an OptionError naming the option;
    numpy scalars and a −∞ threshold are accepted."""
    from rewrite.errors import OptionError
    with pytest.raises(OptionError, match=message):
        SoftNMSConfig(**params)
    cfg = SoftNMSConfig(max_det=np.int64(7), sigma=np.float32(0.25), iou_threshold=np.float64(1.0),
                        min_score=-math.inf)
    assert cfg.max_det == 7 and cfg.min_score == -math.inf


def test_inspect_lists_nms_sites_in_text(tmp_path, capsys):
    src = tmp_path / "det.onnx"
    detector(src, 1, runtime_params=True)
    assert main(["inspect", str(src)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "NMS site nms0: nms (onnx NonMaxSuppression, boxes cxcywh" in out
    assert "max_output_boxes_per_class=max_out" in out  # a run-time input is named, not evaluated


def test_fx_program_without_nms_is_refused(tmp_path, capsys):
    from rewrite.io import save_pt2
    src, out = tmp_path / "m.pt2", tmp_path / "out.pt2"
    save_pt2(torch.export.export(torch.nn.Linear(4, 2), (torch.randn(3, 4),)), src)
    assert main(["convert", str(src), "-o", str(out), "--soft-nms", "gaussian"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "NonMaxSuppression" in err and not out.exists()


def test_torchvision_nms_spelling_is_recognized_and_skipped(monkeypatch):
    """The guarded FX spelling, exercised with a stand-in ``torchvision::nms`` op (torchvision itself is not
    installable here): recognized as an NMS site, reported as skipped by the pass (its callers read the original
    scores), so convert refuses the model."""
    import importlib.util
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: its own op is registered")
    from rewrite.graph import fx as fx_adapter
    from rewrite.graph.fx import FxGraph
    from rewrite.recognize import recognize
    lib = torch.library.Library("torchvision", "FRAGMENT")
    if not hasattr(torch.ops.torchvision, "nms"):
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

        def kernel(dets, scores, iou_threshold):
            keep = ref_hard_nms(dets.double().numpy(), scores.double().numpy(), iou_threshold)
            return torch.tensor(keep, dtype=torch.int64)

        def fake(dets, scores, iou_threshold):
            return dets.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int64)

        lib.impl("nms", kernel, "CPU")
        torch.library.register_fake("torchvision::nms", fake, lib=lib)
    op = torch.ops.torchvision.nms.default
    monkeypatch.setitem(fx_adapter._TABLE, op, fx_adapter._nms)

    class Head(torch.nn.Module):
        def forward(self, boxes, scores):
            return torch.ops.torchvision.nms(boxes, scores, 0.5)

    boxes, scores = random_sets(0, 1, 20)
    ep = torch.export.export(Head(), (torch.from_numpy(boxes[0]).float(), torch.from_numpy(scores[0]).float()))
    sites = recognize(FxGraph(ep.module())).nms_sites
    assert [(s.spelling, s.box_layout, s.params["iou_threshold"]) for s in sites] == [("torchvision::nms", "xyxy", 0.5)]
    from passes.detect.nms_pass import SoftNMSPass
    from rewrite.io import from_exported_program
    result = SoftNMSPass({"method": "gaussian"}).run(from_exported_program(ep))
    assert not result.modified and result.report["sites"][0]["status"] == "skipped"
    assert "append_soft_nms" in result.report["sites"][0]["reason"]


def test_form_choice():
    from passes.detect.onnx_nms import use_matrix
    assert use_matrix(48) and use_matrix(256, None, None)
    assert use_matrix(None) is None and use_matrix("N") is None and not use_matrix(4096, 80, 100)
    assert use_matrix(300, 20, 100) and not use_matrix(1000, 1, 100) and not use_matrix(1000, 4, 100)
    assert use_matrix(1000, 20, 100) and not use_matrix(1000, None, 100)


@pytest.mark.parametrize("method", ["linear", "gaussian", "hard"])
@pytest.mark.parametrize("n", [40, 300])
def test_run_time_form_choice_equals_reference_on_both_branches(method, n):
    """``matrix=None`` (the pass's choice for an unknown box count): an ``If`` on N takes the weight matrix up to
    MATRIX_ALWAYS_BOXES boxes and IoU rows above; both branches equal the reference."""
    from passes.detect.onnx_nms import MATRIX_ALWAYS_BOXES
    assert 40 <= MATRIX_ALWAYS_BOXES < 300
    model = soft_nms_model(SoftNMSConfig(method=method, sigma=0.5), 0, matrix=None, window=0)
    assert [node.op_type for node in model.graph.node if node.op_type in ("If", "Loop")] == ["If"]
    cfg = dict(method=method, sigma=0.5, iou_threshold=float(np.float32(0.3)), min_score=float(np.float32(0.01)),
               max_det=25, iou_offset=0, sigma_convention="bodla")
    boxes, _ = random_sets(n, 2, n)
    _, scores = random_sets(n + 1, 4, n)
    scores = scores.reshape(2, 2, n)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    sel, sc = sess.run(None, {"boxes": boxes[..., [1, 0, 3, 2]].astype(np.float32), "scores": scores.astype(np.float32),
                              "max_output_boxes_per_class": np.array([25], np.int64),
                              "iou_threshold": np.array([0.3], np.float32),
                              "score_threshold": np.array([0.01], np.float32)})
    rows, kept = ref_onnx(cfg, boxes, scores)
    assert [tuple(r) for r in sel.tolist()] == rows and len(rows) > 0
    np.testing.assert_allclose(sc.astype(np.float64), kept, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# the multi-select Loop step (several boxes per iteration): same results as the reference, fewer iterations
# --------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def window_session(method, convention, offset, matrix, window, counted=False, steps=None, isolate=None):
    """Our sub-graph with ``window`` candidates per iteration (0: ``steps`` one-pick steps, ``isolate``); ``counted``
    adds the Loop's scan output (one row per iteration) as a last graph output, to count iterations (a test-only
    wrapper: the pass never does this)."""
    cfg = SoftNMSConfig(method=method, sigma=0.5, sigma_convention=convention, iou_offset=offset)
    model = soft_nms_model(cfg, 0, matrix=matrix, window=window, native=not counted, steps=steps,
                           isolate=isolate)  # counted: the Loop itself
    if counted:
        loop = next(n for n in model.graph.node if n.op_type == "Loop")
        model.graph.output.append(helper.make_tensor_value_info(loop.output[-1], TensorProto.BOOL, None))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def sparse_sets(seed, sets, n, score_values):
    """Mostly disjoint boxes (one per cell of a grid, in random order) of which ~20% are replaced by a jittered copy
    of another box (overlap), and scores drawn from ``score_values`` (many exact ties)."""
    rng = np.random.default_rng(seed)
    cell = rng.permutation(64)[:n] if n <= 64 else rng.integers(0, 64, n)
    corner = np.stack([cell % 8, cell // 8], -1) * 20.0
    boxes = np.concatenate([corner, corner + rng.integers(20, 64, size=(n, 2)) / 4], -1)
    boxes = np.broadcast_to(boxes, (sets, n, 4)).copy()
    if n > 1:
        copy = rng.random((sets, n)) < 0.2
        src = rng.integers(0, n, size=(sets, n))
        jitter = rng.integers(-8, 9, size=(sets, n, 4)) / 4
        boxes = np.where(copy[..., None], np.take_along_axis(boxes, src[..., None].repeat(4, -1), 1) + jitter, boxes)
    scores = rng.choice(np.asarray(score_values, np.float32), size=(sets, n))
    return boxes.astype(np.float32).astype(np.float64), scores.astype(np.float64)


@settings(FAST, max_examples=120)
@given(method=st.sampled_from(["linear", "gaussian", "hard"]), convention=st.sampled_from(["bodla", "tf"]),
       offset=st.sampled_from([0, 1]), matrix=st.booleans(), window=st.sampled_from([0, 1, 2, 3, 8, 16]),
       seed=st.integers(0, 2 ** 32 - 1), n=st.integers(0, 40), nt=st.sampled_from([0.0, 0.3, 0.5]),
       thr=st.sampled_from([0.0, 0.001, 0.3, -1.0]), max_det=st.integers(0, 45),
       values=st.sampled_from([(0.25, 0.5, 0.75), (0.0, 0.5, 1.0), (-0.5, 0.0, 0.25, 0.5), (0.9,)]),
       steps=st.sampled_from([1, 2, 4]), isolate=st.booleans())
def test_multi_select_with_ties_and_disjoint_boxes_equals_reference(method, convention, offset, matrix, window,
                                                                    seed, n, nt, thr, max_det, values, steps, isolate):
    """The multi-select step, and the one-pick graph (window 0) with ``steps`` picks per iteration and isolated boxes
    outside the loop: mostly disjoint boxes with many tied scores (the isolated boxes' order comes from a sort)."""
    cfg = dict(method=method, sigma=0.5, iou_threshold=float(np.float32(nt)), min_score=float(np.float32(thr)),
               max_det=max_det, iou_offset=offset, sigma_convention=convention)
    batch, classes = 2, 2
    boxes, _ = sparse_sets(seed, batch, n, values)
    _, scores = sparse_sets(seed + 1, batch * classes, n, values)
    scores = scores.reshape(batch, classes, n)
    sess = window_session(method, convention, offset, matrix, window, steps=steps, isolate=isolate)
    sel, sc = sess.run(None, {"boxes": boxes[..., [1, 0, 3, 2]].astype(np.float32),
                              "scores": scores.astype(np.float32),
                              "max_output_boxes_per_class": np.array([max_det], np.int64),
                              "iou_threshold": np.array([cfg["iou_threshold"]], np.float32),
                              "score_threshold": np.array([cfg["min_score"]], np.float32)})
    rows, kept = ref_onnx(cfg, boxes, scores)
    assert [tuple(r) for r in sel.tolist()] == rows
    np.testing.assert_allclose(sc.astype(np.float64), kept, rtol=0, atol=1e-6)


@pytest.mark.parametrize("matrix", [True, False])
@pytest.mark.parametrize("method", ["linear", "gaussian", "hard"])
def test_multi_select_needs_fewer_iterations_than_picks_on_disjoint_boxes(method, matrix):
    corner = np.stack(np.meshgrid(np.arange(6), np.arange(6)), -1).reshape(-1, 2) * 30.0    # 36 disjoint boxes
    boxes = np.concatenate([corner, corner + 20.0], -1)[None]
    scores = np.random.default_rng(3).permutation(36).astype(np.float64)[None, None] / 36 + 0.01
    feeds = {"boxes": boxes[..., [1, 0, 3, 2]].astype(np.float32), "scores": scores.astype(np.float32),
             "max_output_boxes_per_class": np.array([30], np.int64), "iou_threshold": np.array([0.3], np.float32),
             "score_threshold": np.array([0.001], np.float32)}
    rows, _ = ref_onnx(dict(method=method, sigma=0.5, iou_threshold=float(np.float32(0.3)), min_score=float(
        np.float32(0.001)), max_det=30, iou_offset=0, sigma_convention="bodla"), boxes, scores)
    assert len(rows) == 30
    iterations = {}
    sel, _ = window_session(method, "bodla", 0, matrix, 0).run(None, feeds)  # the one-pick graph (may hold Ifs)
    assert [tuple(r) for r in sel.tolist()] == rows
    for window in (1, 8):
        sel, _, scan = window_session(method, "bodla", 0, matrix, window, counted=True).run(None, feeds)
        assert [tuple(r) for r in sel.tolist()] == rows
        iterations[window] = scan.shape[0]
    assert iterations[1] == 30           # one candidate per iteration: the counter counts what it should
    assert iterations[8] == 4            # ⌈30 / 8⌉: every candidate is disjoint from the others


@pytest.mark.parametrize("isolate", [False, True])
@pytest.mark.parametrize("steps", [1, 4])
def test_steps_and_isolation_cut_iterations_on_disjoint_boxes(steps, isolate):
    """36 disjoint boxes, 30 picks (linear, matrix, zero mode): ``steps`` picks per iteration need ⌈30 / steps⌉
    iterations, and with isolated boxes outside the loop one iteration (nothing interacts); the same rows and
    scores as the reference either way. A pair of overlapping boxes stays in the loop."""
    from passes.detect.onnx_nms import INPUT_NAMES
    from passes.detect.onnx_one_pick import one_pick_graph
    corner = np.stack(np.meshgrid(np.arange(6), np.arange(6)), -1).reshape(-1, 2) * 30.0
    boxes = np.concatenate([corner, corner + 20.0], -1)[None]
    boxes[0, 7] = boxes[0, 3] + [2.0, 0.0, 2.0, 0.0]                                      # IoU 0.82 with box 3
    scores = np.random.default_rng(3).permutation(36).astype(np.float64)[None, None] / 36 + 0.01
    graph = one_pick_graph(SoftNMSConfig(method="linear"), 0, TensorProto.FLOAT, "", True, mode="zero", steps=steps,
                           isolate=isolate)
    loop = next(n for n in graph.node if n.op_type == "Loop")
    graph.output.append(helper.make_tensor_value_info(loop.output[1], TensorProto.INT64, None))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    sel, sc, scan = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, dict(zip(INPUT_NAMES, (boxes[..., [1, 0, 3, 2]].astype(np.float32), scores.astype(np.float32),
                                     np.array([30], np.int64), np.array([0.3], np.float32),
                                     np.array([0.001], np.float32)))))
    cfg = dict(method="linear", sigma=0.5, iou_threshold=float(np.float32(0.3)), min_score=float(np.float32(0.001)),
               max_det=30, iou_offset=0, sigma_convention="bodla")
    rows, kept = ref_onnx(cfg, boxes, scores)
    assert len(rows) == 30 and [tuple(r) for r in sel.tolist()] == rows
    np.testing.assert_allclose(sc.astype(np.float64), kept, rtol=0, atol=1e-6)
    assert scan.shape[0] == (1 if isolate and steps == 4 else 2 if isolate else -(-30 // steps))
    assert scan.shape[-1] == steps


def test_isolation_choice():
    from passes.detect.onnx_nms import use_isolate
    assert use_isolate("linear", 100) and use_isolate("linear", 1000)
    assert not (use_isolate("linear", 99) or use_isolate("linear", None) or use_isolate("gaussian", 1000)
                or use_isolate("hard", 1000))


def test_pass_graph_has_no_iteration_output_and_window_is_documented():
    from passes.detect.onnx_nms import OUTPUT_NAMES, WINDOW, soft_nms_graph
    graph = soft_nms_graph(SoftNMSConfig(method="linear"), window=WINDOW)
    assert [o.name for o in graph.output] == list(OUTPUT_NAMES)
    with pytest.raises(ValueError, match="window"):
        soft_nms_graph(SoftNMSConfig(method="linear"), window=-1)


def test_window_choice():
    from passes.detect.onnx_nms import WINDOW, use_window
    assert use_window("hard", 1000, 1) == use_window("hard", 100, 4) == WINDOW > 0
    assert use_window("hard", 48, 1) == use_window("hard", None, 1) == use_window("gaussian", 1000, 1) == 0
    assert use_window("linear", 1000, 1) == 0                  # one pick, isolated boxes outside the loop
    assert use_window("linear", 300, 20) == use_window("hard", 1000, None) == 0  # many or unknown classes


@pytest.mark.parametrize("method", ["linear", "hard"])
def test_convert_uses_multi_select_or_isolation_on_many_static_boxes(tmp_path, capsys, monkeypatch, method):
    import json
    import sys
    monkeypatch.setattr(sys.modules[__name__], "N_BOXES", 160)
    src, out = tmp_path / "det.onnx", tmp_path / "soft.onnx"
    detector(src, 0)
    assert main(["convert", str(src), "-o", str(out), "--soft-nms", method, "--option", "max_det=40", "--json"]) == 0
    site = json.loads(capsys.readouterr().out)["passes"][0]["sites"][0]
    assert site["form"] == "weight matrix"
    assert (site["window"] > 0, site["isolate"]) == ((True, False) if method == "hard" else (False, True))
    feeds = {"x": np.random.default_rng(5).normal(size=(BATCH, 160, FEATURES)).astype(np.float32)}
    rewritten = onnx.load(out)
    names = [o.name for o in rewritten.graph.output]
    got = dict(zip(names, ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)))
    cfg = dict(method=method, sigma=0.5, iou_threshold=float(np.float32(0.4)), min_score=float(np.float32(0.05)),
               max_det=40, iou_offset=0, sigma_convention="bodla")
    rows, kept = ref_onnx(cfg, xyxy_from(got["boxes"].astype(np.float64), 0), got["scores"].astype(np.float64))
    assert len(rows) > BATCH * CLASSES
    assert [tuple(r) for r in got["selected_indices"].tolist()] == rows
    np.testing.assert_allclose(got["selected_indices_scores"], kept, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# the top-box window (passes.detect.onnx_top): Soft-NMS on the K best boxes of each group when provably enough
# --------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def top_session(method, convention, layout, top, top_form="auto", score_dtype=TensorProto.FLOAT):
    """The graph with the window's ``If`` condition (True: the window's result was taken) as a last output (linear:
    isolated boxes outside the loop, as the pass builds it)."""
    model = soft_nms_model(SoftNMSConfig(method=method, sigma=0.5, sigma_convention=convention), layout,
                           score_dtype, matrix=False, window=0, native=False, top=top, isolate=method == "linear",
                           top_form=top_form)
    branch = next(n for n in model.graph.node if n.op_type == "If" and n.name.endswith("top"))
    model.graph.output.append(helper.make_tensor_value_info(branch.input[0], TensorProto.BOOL, None))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("method,convention", [("linear", "bodla"), ("gaussian", "bodla"), ("gaussian", "tf"),
                                               ("hard", "bodla")])
@pytest.mark.parametrize("layout", [0, 1])
@pytest.mark.parametrize("top_form", ["auto", "matrix", "rows", "run-time"])
def test_top_window_equals_reference_on_both_branches(method, convention, layout, top_form):
    """Window of 12 boxes, caps 3..20, thresholds −1..0.3, distinct and tied scores, 0..39 boxes: every result equals
    the reference, and both the window's result and the fallback are taken on some inputs. Every form of the
    window: its weight matrix (Gaussian: exponents, ``Exp`` per picked row), IoU rows, the run-time choice (2 images
    × 2 classes: rows; one group: the matrix, in the test below)."""
    rng = np.random.default_rng(7)
    taken = set()
    for seed in range(24):
        n = int(rng.integers(0, 40))
        gen = random_sets if seed % 2 else (lambda s, k, m: sparse_sets(s, k, m, (0.25, 0.5, 0.75)))
        boxes, _ = gen(seed, 2, n)
        _, scores = gen(seed + 1, 4, n)
        scores = scores.reshape(2, 2, n)
        for nt, thr, cap in ((0.3, 0.001, 5), (0.5, 0.0, 3), (0.3, 0.3, 20), (0.0, -1.0, 8)):
            cfg = dict(method=method, sigma=0.5, iou_threshold=float(np.float32(nt)), min_score=float(np.float32(thr)),
                       max_det=cap, iou_offset=0, sigma_convention=convention)
            sel, sc, took = top_session(method, convention, layout, 12, top_form).run(None, {
                "boxes": to_layout(boxes, layout, rng).astype(np.float32), "scores": scores.astype(np.float32),
                "max_output_boxes_per_class": np.array([cap], np.int64),
                "iou_threshold": np.array([nt], np.float32), "score_threshold": np.array([thr], np.float32)})
            rows, kept = ref_onnx(cfg, boxes, scores)
            assert [tuple(r) for r in sel.tolist()] == rows
            np.testing.assert_allclose(sc.astype(np.float64), kept, rtol=0, atol=1e-6)
            taken.add(bool(took))
    assert taken == {True, False}


@pytest.mark.parametrize("method,convention", [("linear", "bodla"), ("gaussian", "bodla"), ("gaussian", "tf")])
@pytest.mark.parametrize("top_form", ["auto", "matrix", "rows"])
def test_top_window_unguarded_iou_is_exact_and_checked(method, convention, top_form):
    """The window's IoU has no union guard (finite coordinates with |c| <= 2^500 are checked before its result is
    taken). float64 boxes with coordinates up to 2^499, zero-area boxes, exact duplicates, one group (the run-time
    choice takes the matrix) and 2 × 2 groups: the window's result is taken and equals the graph without a window
    bit for bit (and the reference); a coordinate of 2^501, +inf or NaN makes it fall back to that graph."""
    rng = np.random.default_rng(11)
    full = ort.InferenceSession(soft_nms_model(SoftNMSConfig(method=method, sigma=0.5, sigma_convention=convention),
                                               0, TensorProto.DOUBLE, matrix=True, window=0, native=False,
                                               isolate=method == "linear").SerializeToString(),
                                providers=["CPUExecutionProvider"])
    windowed = top_session(method, convention, 0, 12, top_form, TensorProto.DOUBLE)
    for images, classes in ((1, 1), (2, 2)):
        for trial in range(6):
            n = 40
            scale = 2.0 ** float(rng.choice([-30, 0, 200, 499 - 10]))
            xy = rng.uniform(0, 600, (images, n, 2))
            wh = rng.uniform(0, 120, (images, n, 2)) * (rng.random((images, n, 1)) > 0.15)  # zero areas
            boxes = np.concatenate([xy, xy + wh], 2) * scale
            boxes = np.minimum(boxes, 2.0 ** 499)
            boxes[:, 1] = boxes[:, 0]                                                         # a duplicate
            scores = rng.random((images, classes, n))
            feeds = {"boxes": boxes[..., [1, 0, 3, 2]].copy(), "scores": scores,
                     "max_output_boxes_per_class": np.array([4], np.int64),
                     "iou_threshold": np.array([0.3], np.float32), "score_threshold": np.array([0.001], np.float32)}
            sel, sc, took = windowed.run(None, feeds)
            want_sel, want_sc = full.run(None, feeds)
            assert took and np.array_equal(sel, want_sel) and np.array_equal(sc, want_sc)
            cfg = dict(method=method, sigma=0.5, iou_threshold=float(np.float32(0.3)),
                       min_score=float(np.float32(0.001)), max_det=4, iou_offset=0, sigma_convention=convention)
            rows, kept = ref_onnx(cfg, boxes, scores)
            assert [tuple(r) for r in sel.tolist()] == rows
            np.testing.assert_allclose(sc, kept, rtol=1e-12, atol=0)
            best = int(np.argmax(scores[0, 0]))
            for wild in (2.0 ** 501, np.inf, np.nan):
                bad = {**feeds, "boxes": feeds["boxes"].copy()}
                bad["boxes"][0, best, 3] = wild                                   # inside the window
                sel, sc, took = windowed.run(None, bad)
                want_sel, want_sc = full.run(None, bad)
                assert not took and np.array_equal(sel, want_sel) and np.array_equal(sc, want_sc, equal_nan=True)


def test_top_window_form_must_be_known():
    with pytest.raises(ValueError, match="top_form"):
        soft_nms_model(SoftNMSConfig(method="gaussian"), top=12, top_form="dense")


def test_top_window_choice():
    from passes.detect.onnx_nms import use_top
    assert use_top("linear", 1000, 1, 100) == use_top("linear", 1000, 4, 100) == 150  # linear: 1.5 max_det
    assert use_top("gaussian", 1000, 1, 100) == use_top("gaussian", 1000, 4, 100) == 240  # Gaussian: 2.4 max_det
    assert use_top("linear", 400, 3, 40) == 60 and use_top("gaussian", 400, 1, 40) == 96
    assert use_top("hard", 1000, 1, 100) == 0                    # onnxruntime's NMS behind its check instead
    assert use_top("linear", 590, 1, 100) == use_top("gaussian", 700, 1, 100) == 0    # N < 4K
    assert use_top("linear", 1000, 20, 100) == 0                                       # many classes
    assert use_top("linear", 10000, 1, 200) == use_top("linear", None, 1, 100) == use_top("linear", 1000, 1, None) == 0


@pytest.mark.parametrize("method", ["linear", "gaussian"])
def test_convert_uses_the_top_window_on_many_static_boxes(tmp_path, capsys, monkeypatch, method):
    import json
    import sys
    monkeypatch.setattr(sys.modules[__name__], "N_BOXES", 400)
    src, out = tmp_path / "det.onnx", tmp_path / "soft.onnx"
    detector(src, 1)
    assert main(["convert", str(src), "-o", str(out), "--soft-nms", method, "--option", "max_det=40",
                 "--json"]) == 0
    site = json.loads(capsys.readouterr().out)["passes"][0]["sites"][0]
    assert (site["top"], site["isolate"]) == ((60, True) if method == "linear" else (96, False))  # 3 classes
    assert not site["native_nms"]
    feeds = {"x": np.random.default_rng(5).normal(size=(BATCH, 400, FEATURES)).astype(np.float32)}
    rewritten = onnx.load(out)
    names = [o.name for o in rewritten.graph.output]
    got = dict(zip(names, ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)))
    cfg = dict(method=method, sigma=0.5, iou_threshold=float(np.float32(0.4)), min_score=float(np.float32(0.05)),
               max_det=40, iou_offset=0, sigma_convention="bodla")
    rows, kept = ref_onnx(cfg, xyxy_from(got["boxes"].astype(np.float64), 1), got["scores"].astype(np.float64))
    assert len(rows) > BATCH * CLASSES
    assert [tuple(r) for r in got["selected_indices"].tolist()] == rows
    np.testing.assert_allclose(got["selected_indices_scores"], kept, rtol=1e-6, atol=1e-6)

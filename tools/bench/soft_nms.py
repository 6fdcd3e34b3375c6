"""Soft-NMS quality (VOC AP on synthetic scenes) and speed (onnxruntime) against hard NMS.

Quality: ``random_shapes(allow_overlap=True)`` scenes with synthetic detections (tools/bench/detection_eval.py:
jittered true positives, lower-scored jittered duplicates, false positives, a score for every class). Every method
runs as ONNX in onnxruntime on the same detections: onnxruntime's own ``NonMaxSuppression`` (hard NMS), and our
Soft-NMS sub-graph (passes.detect.onnx_nms) with ``linear``, ``gaussian`` and ``hard``; the selected boxes keep the
score each method returns (Soft-NMS: the decayed score). mAP is VOC all-point at IoU 0.5 over the four shape
classes. Same settings for all: N_t (linear gate / hard threshold), score threshold 0.001, 100 boxes per class.

Speed: milliseconds per image of one session run (intra-op threads 1), onnxruntime NMS vs our Soft-NMS, on the
scenes and on larger synthetic inputs (N boxes, C classes), for both weight forms (matrix / IoU rows) and both Loop
steps (one pick per iteration, or the exact multi-select step with a window of 8 candidates). Times are the
process's CPU time (``time.process_time``), not wall time: the machine is shared, and wall time counts other jobs.

Usage: ``PYTHONPATH=. python tools/bench/soft_nms.py [--images 300] [--quick] [--out tools/bench/results/soft_nms.json]``
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from machine import describe  # noqa: E402  tools/bench/machine.py
import detection_eval as ev  # noqa: E402  tools/bench/detection_eval.py
from passes.detect.config import SoftNMSConfig  # noqa: E402
from passes.detect.onnx_nms import WINDOW, soft_nms_model, use_window  # noqa: E402

MIN_SCORE, MAX_DET, SIGMA = 0.001, 100, 0.5


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def ort_nms_model() -> onnx.ModelProto:
    """onnxruntime's own NonMaxSuppression with the same five inputs as our sub-graph."""
    names = ("boxes", "scores", "max_output_boxes_per_class", "iou_threshold", "score_threshold")
    node = helper.make_node("NonMaxSuppression", list(names), ["selected_indices"], center_point_box=0)
    types = (TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.INT64, TensorProto.FLOAT, TensorProto.FLOAT)
    shapes = (["B", "N", 4], ["B", "C", "N"], [1], [1], [1])
    graph = helper.make_graph([node], "nms", [helper.make_tensor_value_info(n, t, s) for n, t, s in
                                              zip(names, types, shapes)],
                              [helper.make_tensor_value_info("selected_indices", TensorProto.INT64, ["M", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


def feeds(boxes: np.ndarray, scores: np.ndarray, nt: float) -> dict[str, np.ndarray]:
    """ONNX NMS inputs for one image: xyxy boxes as [y1, x1, y2, x2], scores (N, C) as (1, C, N)."""
    return {"boxes": boxes[None][..., [1, 0, 3, 2]].astype(np.float32),
            "scores": scores.T[None].astype(np.float32).copy(),
            "max_output_boxes_per_class": np.array([MAX_DET], np.int64),
            "iou_threshold": np.array([nt], np.float32), "score_threshold": np.array([MIN_SCORE], np.float32)}


def run_method(sess: ort.InferenceSession, images: list, nt: float) -> tuple[list, float]:
    """Final detections per image (boxes, scores, classes) and the median CPU ms per image over 3 timed passes."""
    inputs = [feeds(b, s, nt) for b, s in images]
    outputs = [sess.run(None, f) for f in inputs]  # warm-up, and the results
    times = []
    for _ in range(3):
        start = time.process_time()
        for f in inputs:
            sess.run(None, f)
        times.append((time.process_time() - start) / len(inputs) * 1e3)
    finals = []
    for (boxes, scores), out in zip(images, outputs):
        sel = out[0].reshape(-1, 3)
        kept = out[1] if len(out) > 1 else scores[sel[:, 2], sel[:, 1]]
        finals.append((boxes[sel[:, 2]], np.asarray(kept, np.float64), sel[:, 1]))
    return finals, float(np.median(times))


def quality(n_images: int, seed: int = 0, overlap: bool = True) -> tuple[list[dict], dict]:
    """mAP@0.5 of every method at N_t 0.3 and 0.5 on ``n_images`` scenes (``overlap``: ``allow_overlap``)."""
    rng = np.random.default_rng(seed)
    truth = [ev.scene(seed * 100003 + i, overlap=overlap) for i in range(n_images)]
    images = [ev.detections(b, c, rng) for b, c in truth]
    stats = {"images": n_images, "objects": int(sum(len(b) for b, _ in truth)),
             "detections_per_image": float(np.mean([len(b) for b, _ in images])),
             "same_class_gt_pairs_iou_gt_0.3": int(sum(
                 int(np.sum(np.triu((ev.iou_matrix(b, b) > 0.3) & (c[:, None] == c[None, :]), 1)))
                 for b, c in truth))}
    ort_nms = _session(ort_nms_model())
    rows = []
    for nt in (0.3, 0.5):
        methods = {"onnxruntime NMS (hard)": ort_nms}
        for method in ("hard", "linear", "gaussian"):  # N here is small: the weight-matrix form (as the pass picks)
            cfg = SoftNMSConfig(method=method, sigma=SIGMA)  # and one pick per iteration (as the pass picks)
            methods[f"soft-nms {method}"] = _session(soft_nms_model(cfg, window=use_window(method, None)))
        for method in ("hard", "linear", "gaussian"):  # the multi-select step: same detections, for its time
            cfg = SoftNMSConfig(method=method, sigma=SIGMA)
            methods[f"soft-nms {method} multi-{WINDOW}"] = _session(soft_nms_model(cfg, window=WINDOW))
        for name, sess in methods.items():
            finals, ms = run_method(sess, images, nt)
            m_ap, per_class = ev.mean_ap(finals, truth)
            rows.append({"method": name, "iou_threshold": nt, "sigma": SIGMA if "gaussian" in name else None,
                         "mAP50": m_ap, "per_class_AP50": dict(zip(ev.CLASSES, per_class)), "ms_per_image": ms,
                         "boxes_kept_per_image": float(np.mean([len(f[0]) for f in finals]))})
    return rows, stats


def speed(sizes: list[tuple[int, int]], seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    ort_nms = _session(ort_nms_model())
    soft = {f"{m} {'matrix' if matrix else 'rows'}{f' multi-{w}' if w else ''}": _session(soft_nms_model(
        SoftNMSConfig(method=m, sigma=SIGMA), matrix=matrix, window=w))
        for m in ("linear", "hard", "gaussian") for matrix in (True, False) for w in (0, WINDOW)}
    for n, c in sizes:
        xy = rng.uniform(0, 600, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(10, 120, (n, 2))], 1)
        images = [(boxes, rng.random((n, c)))]
        row = {"boxes": n, "classes": c}
        for name, sess in (("onnxruntime NMS", ort_nms), *((f"soft-nms {m}", s) for m, s in soft.items())):
            runs = []
            for _ in range(5):
                _, ms = run_method(sess, images, 0.5)
                runs.append(ms)
            row[name] = float(np.median(runs))
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--quick", action="store_true", help="60 images, small speed sizes")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "soft_nms.json"))
    args = ap.parse_args(argv)
    n_images = 60 if args.quick else args.images
    sizes = [(100, 1), (1000, 1)] if args.quick else [(100, 1), (300, 20), (1000, 1), (1000, 4)]
    cpu = describe()
    rows, stats = quality(n_images)
    control, control_stats = quality(n_images, overlap=False)
    fast = speed(sizes)
    print(f"Soft-NMS vs hard NMS — {cpu}; onnxruntime {ort.__version__}, 1 thread")
    print(f"{stats['images']} random_shapes scenes, {stats['objects']} objects, "
          f"{stats['detections_per_image']:.1f} detections/image, {stats['same_class_gt_pairs_iou_gt_0.3']} same-class "
          "object pairs with IoU > 0.3")
    print(f"{'method':<30}{'N_t':>5}{'mAP@0.5':>10}{'kept/img':>10}{'ms/img':>9}")
    for r in rows:
        print(f"{r['method']:<30}{r['iou_threshold']:>5}{r['mAP50']:>10.4f}{r['boxes_kept_per_image']:>10.1f}"
              f"{r['ms_per_image']:>9.3f}")
    cols = [k for k in fast[0] if k.startswith("soft-nms")]
    print(f"\ncontrol: allow_overlap=False ({control_stats['objects']} objects, "
          f"{control_stats['same_class_gt_pairs_iou_gt_0.3']} same-class pairs with IoU > 0.3)")
    for r in control:
        print(f"{r['method']:<30}{r['iou_threshold']:>5}{r['mAP50']:>10.4f}{r['boxes_kept_per_image']:>10.1f}"
              f"{r['ms_per_image']:>9.3f}")
    print(f"\nCPU ms per image (max 100 per class; 'matrix' precomputes the N×N weights, 'rows' computes IoU rows; "
          f"'multi-{WINDOW}': up to {WINDOW} picks per Loop iteration)")
    print(f"{'boxes':>6}{'classes':>8}{'ORT NMS':>10}" + "".join(f"{c[9:]:>24}" for c in cols))
    for r in fast:
        print(f"{r['boxes']:>6}{r['classes']:>8}{r['onnxruntime NMS']:>10.3f}" + "".join(f"{r[c]:>24.3f}" for c in cols))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu, "onnxruntime": ort.__version__, "settings": {
        "min_score": MIN_SCORE, "max_det": MAX_DET, "sigma": SIGMA, "window": WINDOW,
        "time": "process CPU time"}, "scenes": stats, "quality": rows,
        "control_scenes": control_stats, "control_quality": control,
        "speed": fast}, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Synthetic detection scenes and a VOC-style AP, for the Soft-NMS benchmark (tools/bench/soft_nms.py) and its test.

Scenes: ground-truth boxes of ``skimage.draw.random_shapes(allow_overlap=True)`` (rows/columns half-open, so
xyxy = (c0, r0, c1, r1) with offset-0 IoU; clipped to the image, since triangles may start outside it). The shape
category is the class. The pixels are not used: detections are synthesized around the label boxes by a noisy
"detector" (``DetectorModel``): each object is found with some probability, with a jittered box and a noisy score,
plus jittered duplicates with lower scores (what NMS exists to remove) and false positives; every detection carries
a score for every class (its own class high, the others low), as a detector head's output does.

AP: PASCAL VOC (2010+) — per class, detections sorted by score, each matched greedily to the unmatched ground truth
of its image with the highest IoU ≥ 0.5 (else a false positive), precision made monotone (the upper envelope) and
integrated over every recall step ("all-point interpolation"); mAP is the mean over classes with ground truth.
Not imported by the library.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

CLASSES = ("rectangle", "circle", "triangle", "ellipse")


@dataclass(frozen=True)
class DetectorModel:
    """Parameters of the synthetic detector (box jitter is a fraction of the object's width / height)."""

    recall: float = 0.92            # probability that an object gets a true detection
    jitter: float = 0.06            # σ of the true detection's coordinates
    duplicates: float = 2.0         # mean number of extra (duplicate) detections per found object (Poisson)
    duplicate_jitter: float = 0.15  # σ of a duplicate's coordinates
    false_positives: float = 3.0    # mean number of background false positives per image (Poisson)
    other_class: float = 0.04       # scale of the scores a detection gets for the other classes


def scene(seed: int, size: int = 128, max_shapes: int = 14, overlap: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth of one ``random_shapes`` scene: boxes (G, 4) xyxy float64 and class ids (G,). ``overlap``
    False is the control (shapes placed without overlap: few objects, nothing for Soft-NMS to rescue)."""
    from skimage.draw import random_shapes
    _, labels = random_shapes((size, size), max_shapes=max_shapes, min_shapes=max_shapes // 2, min_size=16,
                              max_size=size // 2, allow_overlap=overlap, rng=seed)
    boxes, classes = [], []
    for category, ((r0, r1), (c0, c1)) in labels:
        box = np.clip([c0, r0, c1, r1], 0, size).astype(np.float64)
        if box[2] - box[0] >= 2 and box[3] - box[1] >= 2:
            boxes.append(box)
            classes.append(CLASSES.index(category))
    return np.array(boxes, np.float64).reshape(-1, 4), np.array(classes, np.int64)


def detections(gt_boxes: np.ndarray, gt_classes: np.ndarray, rng: np.random.Generator, size: int = 128,
               model: DetectorModel = DetectorModel()) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic detections of one image: boxes (N, 4) xyxy and scores (N, C) for the C classes."""
    boxes, scores = [], []

    def add(box: np.ndarray, cls: int, score: float) -> None:
        row = rng.uniform(0, model.other_class, len(CLASSES)) * score
        row[cls] = score
        x1, x2 = sorted(np.clip(box[[0, 2]], 0, size))
        y1, y2 = sorted(np.clip(box[[1, 3]], 0, size))
        boxes.append([x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)])
        scores.append(np.clip(row, 0, 1))

    for box, cls in zip(gt_boxes, gt_classes):
        wh = np.tile(box[2:] - box[:2], 2)
        if rng.random() < model.recall:
            quality = rng.beta(5, 2)  # how confident the detector is about this object
            add(box + rng.normal(0, model.jitter, 4) * wh, cls, 0.3 + 0.7 * quality)
            for _ in range(rng.poisson(model.duplicates)):
                add(box + rng.normal(0, model.duplicate_jitter, 4) * wh, cls,
                    (0.3 + 0.7 * quality) * rng.uniform(0.4, 0.95))
    for _ in range(rng.poisson(model.false_positives)):
        xy = rng.uniform(0, size * 0.8, 2)
        add(np.concatenate([xy, xy + rng.uniform(10, size / 2, 2)]), int(rng.integers(len(CLASSES))),
            rng.uniform(0.05, 0.6))
    return np.array(boxes, np.float64).reshape(-1, 4), np.array(scores, np.float64).reshape(-1, len(CLASSES))


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU (offset 0) of xyxy boxes a (n, 4) and b (m, 4)."""
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC all-point interpolated AP from recall / precision at each rank (recall non-decreasing)."""
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]  # upper envelope: best precision at any recall ≥ r
    steps = np.flatnonzero(r[1:] != r[:-1])
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def class_ap(dets: Sequence[tuple[int, float, np.ndarray]], gts: dict[int, np.ndarray], iou: float = 0.5) -> float:
    """AP of one class: ``dets`` = (image, score, box) triples, ``gts`` = image → ground-truth boxes (n, 4).
    NaN when the class has no ground truth."""
    total = sum(len(b) for b in gts.values())
    if total == 0:
        return float("nan")
    order = sorted(range(len(dets)), key=lambda i: -dets[i][1])
    used = {img: np.zeros(len(b), bool) for img, b in gts.items()}
    tp = np.zeros(len(order))
    for rank, i in enumerate(order):
        img, _, box = dets[i]
        gt = gts.get(img, np.zeros((0, 4)))
        if len(gt):
            overlaps = iou_matrix(box[None], gt)[0]
            overlaps[used[img]] = -1.0
            best = int(np.argmax(overlaps))
            if overlaps[best] >= iou:
                used[img][best] = True
                tp[rank] = 1
    ctp = np.cumsum(tp)
    ranks = np.arange(1, len(order) + 1)
    return average_precision(ctp / total, ctp / np.maximum(ranks, 1))


def mean_ap(per_image: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
            ground_truth: Sequence[tuple[np.ndarray, np.ndarray]], iou: float = 0.5) -> tuple[float, list[float]]:
    """mAP over classes: ``per_image`` = (boxes (K, 4), scores (K,), classes (K,)) of the final detections of each
    image, ``ground_truth`` = (boxes, classes) per image. Returns (mAP, per-class AP)."""
    aps = []
    for cls in range(len(CLASSES)):
        dets = [(img, float(s), b) for img, (boxes, scores, classes) in enumerate(per_image)
                for b, s, c in zip(boxes, scores, classes) if c == cls]
        gts = {img: g[c == cls] for img, (g, c) in enumerate(ground_truth)}
        aps.append(class_ap(dets, gts, iou))
    valid = [a for a in aps if not np.isnan(a)]
    return float(np.mean(valid)) if valid else float("nan"), aps

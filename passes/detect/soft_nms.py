"""Soft-NMS in plain PyTorch, written so ``torch.export`` accepts it (semantics: :mod:`passes.detect.config`).

The loop is bounded: at most ``max_det`` iterations (fewer when the box count is a static smaller number), each
``argmax → IoU row → decay → mask``, vectorised over independent groups (classes / images). There is no
data-dependent Python control flow; an exported program contains the unrolled iterations.

Boxes are (x1, y1, x2, y2); ``iou_offset`` 1 adds one to widths and heights (Bodla's pixel convention).
"""
from __future__ import annotations

from typing import Any

import torch

from .config import SoftNMSConfig


def _config(cfg: SoftNMSConfig | None, params: dict[str, Any]) -> SoftNMSConfig:
    if cfg is not None and params:
        raise TypeError("give either a SoftNMSConfig or keyword parameters, not both")
    return cfg if cfg is not None else SoftNMSConfig(**params)


def soft_nms_groups(boxes: torch.Tensor, scores: torch.Tensor, cfg: SoftNMSConfig
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft-NMS on ``G`` independent groups at once.

    ``boxes``: (G, N, 4) xyxy; ``scores``: (G, N). Returns ``(index, score, valid)``, each (G, T) with
    T = min(max_det, N) when N is static, else max_det: the box picked at iteration t of group g, its decayed
    score (float64) at the time it was picked, and whether the pick is real (once False, False for the rest of
    the group). Inputs are not modified.
    """
    n = boxes.shape[1]
    steps = min(cfg.max_det, n) if isinstance(n, int) else cfg.max_det
    s = scores.to(torch.float64)
    alive = s >= cfg.min_score
    coords = boxes.to(torch.float64)
    x1, y1, x2, y2 = coords[..., 0], coords[..., 1], coords[..., 2], coords[..., 3]
    off = float(cfg.iou_offset)
    area = (x2 - x1 + off) * (y2 - y1 + off)
    columns = torch.arange(n, device=boxes.device).unsqueeze(0)
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float64, device=boxes.device)
    picks, picked_scores, picked_valid = [], [], []
    for _ in range(steps):
        idx = torch.where(alive, s, neg_inf).argmax(dim=1, keepdim=True)           # (G, 1)
        best = s.gather(1, idx)
        valid = alive.gather(1, idx)
        iw = (torch.minimum(x2, x2.gather(1, idx)) - torch.maximum(x1, x1.gather(1, idx)) + off).clamp(min=0.0)
        ih = (torch.minimum(y2, y2.gather(1, idx)) - torch.maximum(y1, y1.gather(1, idx)) + off).clamp(min=0.0)
        inter = iw * ih
        union = area + area.gather(1, idx) - inter
        positive = union > 0
        iou = torch.where(positive, inter / torch.where(positive, union, torch.ones_like(union)),
                          torch.zeros_like(union))
        keep = alive & (columns != idx)
        if cfg.method == "linear":
            decayed = s * torch.where(iou > cfg.iou_threshold, 1.0 - iou, torch.ones_like(iou))
        elif cfg.method == "gaussian":
            decayed = s * torch.exp(-(iou * iou) / cfg.gaussian_denominator)
        else:
            decayed = s
        if cfg.discards_above_threshold:
            keep = keep & ~(iou > cfg.iou_threshold)
        keep = keep & (decayed >= cfg.min_score)
        s = torch.where(valid, decayed, s)
        alive = torch.where(valid, keep, alive)
        picks.append(idx)
        picked_scores.append(best)
        picked_valid.append(valid)
    if not picks:
        empty = scores.new_zeros((scores.shape[0], 0))
        return empty.long(), empty.double(), empty.bool()
    return torch.cat(picks, 1), torch.cat(picked_scores, 1), torch.cat(picked_valid, 1)


def soft_nms(boxes: torch.Tensor, scores: torch.Tensor, cfg: SoftNMSConfig | None = None, **params: Any
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-NMS of one set of boxes: ``boxes`` (N, 4) xyxy, ``scores`` (N,).

    Returns ``(keep, kept_scores)``: int64 indices into ``boxes`` in selection order and their decayed scores (in
    ``scores``' dtype), non-increasing. ``cfg`` or keyword parameters of :class:`SoftNMSConfig`.
    """
    cfg = _config(cfg, params)
    index, score, valid = soft_nms_groups(boxes.unsqueeze(0), scores.unsqueeze(0), cfg)
    return index[0][valid[0]], score[0][valid[0]].to(scores.dtype)


def class_offset_boxes(boxes: torch.Tensor, idxs: torch.Tensor, iou_offset: int) -> torch.Tensor:
    """Boxes shifted by ``idxs · D`` on both axes, D = coordinate span + 1 + ``iou_offset``, so boxes of different
    classes never overlap (IoU exactly 0) and one Soft-NMS treats every class separately."""
    span = (boxes.max() - boxes.min()).to(torch.float64) + 1.0 + float(iou_offset)
    return boxes.to(torch.float64) + (idxs.to(torch.float64) * span).unsqueeze(-1)


def batched_soft_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor,
                     cfg: SoftNMSConfig | None = None, **params: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class Soft-NMS via class offsets (``torchvision.ops.batched_nms``'s trick): ``idxs`` (N,) class of each
    box. Returns ``(keep, kept_scores)`` over all classes in selection order (the classes' selections merged by
    decayed score); ``max_det`` caps the total."""
    cfg = _config(cfg, params)
    return soft_nms(class_offset_boxes(boxes, idxs, cfg.iou_offset), scores, cfg)

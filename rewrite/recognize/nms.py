"""NMS sites: ONNX ``NonMaxSuppression`` nodes and, when torchvision is importable, FX ``torchvision::nms`` calls.

Both arrive as the canonical kind ``nms`` (inputs: boxes, scores, max_output_boxes_per_class, iou_threshold,
score_threshold; absent ones are None). ``torchvision.ops.batched_nms`` has no op of its own: exported, it is the
class-offset arithmetic followed by ``torchvision::nms``, so it is recognized as that call.
"""
from __future__ import annotations

from typing import Any

from ..graph.base import GraphView
from ..sites import NMSSite
from .common import Spelling, fail

_LAYOUTS = {0: "yxyx", 1: "cxcywh"}


def _param(g: GraphView, value: Any) -> Any:
    """A parameter for reports: its number when constant, the value's name when fed at run time, None if absent."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return value
    number = g.scalar(value)
    return number if number is not None else g.value_name(value)


def _check_rank(g: GraphView, node: Any, value: Any, rank: int, what: str) -> None:
    shape = g.shape(value)
    if shape is not None and len(shape) != rank:
        raise fail(g, node, f"{what} of rank {rank}", f"shape {shape}")


def onnx_nms_site(g: GraphView, node: Any, index: int) -> NMSSite:
    """An ONNX ``NonMaxSuppression``: boxes (B, N, 4), scores (B, C, N), ``center_point_box`` 0 or 1."""
    rule = dict(getattr(node, "metadata_props", None) or {}).get("rw.rule", "")
    if rule.startswith("soft_nms:"):  # hard Soft-NMS calls NonMaxSuppression itself (passes/detect/onnx_native.py)
        raise fail(g, node, "a NonMaxSuppression of the model", f"part of an inserted Soft-NMS ({rule})")
    canon = g.canon(node)
    boxes, scores, max_out, iou, score = canon.inputs
    layout = _LAYOUTS.get(canon.attrs["center_point_box"])
    if layout is None:
        raise fail(g, node, "center_point_box 0 or 1", f"center_point_box {canon.attrs['center_point_box']}")
    _check_rank(g, node, boxes, 3, "boxes")
    _check_rank(g, node, scores, 3, "scores")
    output = g.outputs(node)[0]
    return NMSSite(name=f"nms{index}", node=g.node_name(node), spelling="onnx NonMaxSuppression", boxes=boxes,
                   scores=scores, output=output, box_layout=layout, max_output=max_out, iou_threshold=iou,
                   score_threshold=score, anchor=node,
                   params={"max_output_boxes_per_class": _param(g, max_out), "iou_threshold": _param(g, iou),
                           "score_threshold": _param(g, score), "output": g.value_name(output)})


def torchvision_nms_site(g: GraphView, node: Any, index: int) -> NMSSite:
    """An FX ``torchvision::nms(boxes (N, 4) xyxy, scores (N,), iou_threshold)``."""
    canon = g.canon(node)
    boxes, scores, _, iou, _ = canon.inputs
    _check_rank(g, node, boxes, 2, "boxes")
    _check_rank(g, node, scores, 1, "scores")
    return NMSSite(name=f"nms{index}", node=g.node_name(node), spelling="torchvision::nms", boxes=boxes,
                   scores=scores, output=node, box_layout="xyxy", iou_threshold=iou, anchor=node,
                   params={"iou_threshold": _param(g, iou), "output": g.value_name(node)})


NMS_SPELLINGS: tuple[Spelling, ...] = (
    Spelling("nms", ("nms",), "onnx-nms", "ONNX NonMaxSuppression: boxes (B, N, 4), scores (B, C, N), "
             "center_point_box 0 ([y1, x1, y2, x2]) or 1 ([xc, yc, w, h]); optional inputs constant or fed at "
             "run time", onnx_nms_site),
    Spelling("nms", ("nms",), "torchvision-nms", "FX torchvision::nms (batched_nms exports to it): boxes (N, 4) "
             "xyxy, scores (N,); listed only when torchvision is importable", torchvision_nms_site),
)


def nms_site(g: GraphView, node: Any, index: int) -> NMSSite:
    """The :class:`NMSSite` of a node of canonical kind ``nms``; :class:`~rewrite.sites.NoMatch` with a reason when
    it does not qualify."""
    handler = onnx_nms_site if g.kind == "onnx" else torchvision_nms_site
    return handler(g, node, index)

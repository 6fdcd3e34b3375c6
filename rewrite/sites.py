"""Typed records of what recognizers find: attention sites, classifier heads, NMS sites, and reasons for non-matches."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: Mask kinds of an attention site: what the original attention masks, in canonical terms.
MASK_KINDS = ("none", "key_padding", "causal", "additive", "boolean", "causal+padding")


@dataclass
class MaskTerm:
    """One masking operation on the attention scores.

    ``mode``: ``"add"`` (value is an additive float mask), ``"keep"`` (value is bool, True = attend),
    ``"drop"`` (value is bool, True = masked out). ``fill`` is the value written where masked (keep/drop).
    """

    value: Any
    mode: str
    fill: float | None = None


@dataclass
class AttentionSite:
    """One softmax attention block, bound to values of its graph.

    Values are graph handles (``fx.Node`` / ``onnx_ir.Value``). ``k_transposed`` is True when ``k`` is the right
    operand of the score matmul (Kᵀ, shape (..., D, T)); the emitters transpose it back to (..., T, D).
    ``layout``: ``"BHSD"`` (4-D), ``"(BH)SD"`` (3-D, heads merged into batch) or ``"BSE"`` (fused ops that take
    packed hidden states). ``nodes`` are the names of the nodes the site covers (replaced by a rewrite).
    """

    name: str
    spelling: str
    q: Any
    k: Any
    v: Any
    output: Any
    scale: float
    causal: bool
    mask: str
    heads: int | None
    kv_heads: int | None
    head_dim: int | None
    layout: str
    k_transposed: bool = False
    mask_terms: list[MaskTerm] = field(default_factory=list)
    dtype: str | None = None
    nodes: list[str] = field(default_factory=list)
    anchor: Any = None  # the softmax (or fused) node; the FX emitter erases it with the replaced chain

    def summary(self) -> dict[str, Any]:
        """The JSON-able description printed by ``softswap inspect``."""
        return {"name": self.name, "spelling": self.spelling, "scale": self.scale, "causal": self.causal,
                "mask": self.mask, "heads": self.heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "layout": self.layout, "dtype": self.dtype, "nodes": list(self.nodes)}


@dataclass
class ClassifierHead:
    """The final Linear/Gemm producing class scores, optionally followed by (Log)Softmax."""

    name: str
    node: str
    in_features: int | None
    num_classes: int | None
    activation: str  # "none" | "softmax" | "log_softmax"
    output: str
    # graph handles (fx.Node / onnx_ir.Value) for passes that replace the head; not part of the summary
    feature: Any = field(default=None, repr=False)       # the (N, D) value the head linear reads
    scores: Any = field(default=None, repr=False)        # the (N, K) value the linear (+ bias) produces
    output_value: Any = field(default=None, repr=False)  # the graph output the head feeds (after any softmax)
    activation_node: Any = field(default=None, repr=False)  # the absorbed (Log)Softmax node, or None

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "node": self.node, "in_features": self.in_features,
                "num_classes": self.num_classes, "activation": self.activation, "output": self.output}


@dataclass
class NMSSite:
    """One non-maximum suppression call: ONNX ``NonMaxSuppression`` or (FX) ``torchvision::nms``.

    ``boxes``, ``scores``, ``output`` and the optional parameters (``max_output``, ``iou_threshold``,
    ``score_threshold``: values, or None when the node omits them) are graph handles. ``box_layout``: ``"yxyx"``
    (ONNX ``center_point_box`` 0), ``"cxcywh"`` (1) or ``"xyxy"`` (torchvision). ``params`` holds what can be read
    statically (constants as numbers, runtime inputs by name) for reports.
    """

    name: str
    node: str
    spelling: str
    boxes: Any
    scores: Any
    output: Any
    box_layout: str
    max_output: Any = None
    iou_threshold: Any = None
    score_threshold: Any = None
    params: dict[str, Any] = field(default_factory=dict)
    anchor: Any = None

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "node": self.node, "spelling": self.spelling, "box_layout": self.box_layout,
                **self.params}


@dataclass
class Reason:
    """Why a region that looks like a site does not qualify: the node, what was expected, what was found."""

    node: str
    op: str
    expected: str
    found: str

    def summary(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.node} ({self.op}): expected {self.expected}; found {self.found}"


class NoMatch(Exception):
    """Raised inside a recognizer to decline a candidate with a :class:`Reason`."""

    def __init__(self, reason: Reason) -> None:
        super().__init__(str(reason))
        self.reason = reason

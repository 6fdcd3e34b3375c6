"""Recognizers: turn regions of a graph into :class:`AttentionSite` and :class:`ClassifierHead` records.

Written once against :mod:`rewrite.graph.base` and run on both graph kinds, split by concern:

- :mod:`.common`: the walk bounds (named), the :class:`~.common.Spelling` row type, failure reasons;
- :mod:`.layout`: the axis-role trace that checks permutations exactly;
- :mod:`.masks`: mask kinds from provenance;
- :mod:`.explicit`: matmul → softmax → matmul chains, anchored at each softmax;
- :mod:`.fused`: fused attention ops (SDPA, ORT, ONNX-23 Attention);
- :mod:`.heads`: classifier heads;
- :mod:`.nms`: non-maximum suppression (ONNX ``NonMaxSuppression``, FX ``torchvision::nms``).

A new site kind (NMS sites, feature taps) adds a module with its own table and an entry in :data:`ANCHORS`.
Every accepted spelling is a table row; :func:`spellings` lists them (``softswap inspect --spellings``). A
candidate that does not qualify raises :class:`~rewrite.sites.NoMatch` with the node, what was expected and what
was found; a wrong match is worse than a miss, so permutations, the softmax axis and the scale are checked exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..graph.base import GraphView
from ..sites import AttentionSite, ClassifierHead, NMSSite, NoMatch, Reason
from .common import NEG_FILL, Spelling
from .explicit import PROB_STEPS_TABLE, SCORE_STEPS_TABLE, explicit_site
from .fused import FUSED_BY_KIND, FUSED_OPS, fused_site
from .heads import HEAD_SPELLINGS, find_heads
from .layout import LAYOUT_STEPS_TABLE
from .masks import MASK_SPELLINGS, classify_mask
from .nms import NMS_SPELLINGS, nms_site

__all__ = ["NEG_FILL", "Recognition", "classify_mask", "find_heads", "recognize", "spellings", "SPELLING_TABLES"]


@dataclass
class Recognition:
    """Everything the recognizers found in one graph."""

    attention_sites: list[AttentionSite] = field(default_factory=list)
    heads: list[ClassifierHead] = field(default_factory=list)
    unmatched: list[tuple[str, Reason]] = field(default_factory=list)  # (softmax node name, reason)
    softmax_count: int = 0
    unknown_ops: dict[str, int] = field(default_factory=dict)
    nms_sites: list[NMSSite] = field(default_factory=list)
    nms_unmatched: list[tuple[str, Reason]] = field(default_factory=list)  # (NMS node name, reason)


#: Every spelling table, in the order recognition uses them (``softswap inspect --spellings``).
SPELLING_TABLES: dict[str, tuple[Spelling, ...]] = {
    "explicit attention: scores (softmax up to Q·Kᵀ)": SCORE_STEPS_TABLE,
    "explicit attention: probabilities (softmax down to P·V)": PROB_STEPS_TABLE,
    "layout trace of q, k, v": LAYOUT_STEPS_TABLE,
    "fused attention ops": FUSED_OPS,
    "mask kinds": MASK_SPELLINGS,
    "classifier heads": HEAD_SPELLINGS,
    "non-maximum suppression": NMS_SPELLINGS,
}


def spellings(graph_kind: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """The accepted spellings per table, with the graph ops each canonical kind stands for in ``graph_kind``
    ("fx", "onnx", or both when None)."""
    from ..graph.vocabulary import ops_of_kind
    out: dict[str, list[dict[str, Any]]] = {}
    for title, rows in SPELLING_TABLES.items():
        out[title] = []
        for row in rows:
            entry = row.summary()
            for gk in (("fx", "onnx") if graph_kind is None else (graph_kind,)):
                entry[gk] = sorted({op for kind in row.kinds for op in ops_of_kind(gk, kind)})
            out[title].append(entry)
    return out


def _unmatched_log_softmax(g: GraphView, node: Any) -> Reason:
    return Reason(g.node_name(node), g.op_name(node), "softmax (not log-softmax) inside attention",
                  "a log-softmax that is not a classifier output")


def recognize(g: GraphView, graph_outputs: list[Any] | None = None) -> Recognition:
    """Find every attention site, classifier head, NMS site and unmatched softmax in ``g`` (one pass over the
    nodes)."""
    result = Recognition()
    softmaxes = []
    for node in g.nodes():
        canon = g.canon(node)
        if canon is None:
            op = g.op_name(node)
            if "::" in op and not op.startswith("com.microsoft::"):
                result.unknown_ops[op] = result.unknown_ops.get(op, 0) + 1
            continue
        if canon.kind == "softmax":
            softmaxes.append(node)
        elif canon.kind in FUSED_BY_KIND:
            try:
                result.attention_sites.append(fused_site(g, node, len(result.attention_sites)))
            except NoMatch as miss:
                result.unmatched.append((g.node_name(node), miss.reason))
        elif canon.kind == "nms":
            try:
                result.nms_sites.append(nms_site(g, node, len(result.nms_sites)))
            except NoMatch as miss:
                result.nms_unmatched.append((g.node_name(node), miss.reason))
    result.softmax_count = len(softmaxes)
    if graph_outputs is not None:
        result.heads, absorbed = find_heads(g, graph_outputs)
    else:
        absorbed = set()
    for node in softmaxes:
        if id(node) in absorbed:
            continue
        if g.canon(node).attrs["log"]:
            result.unmatched.append((g.node_name(node), _unmatched_log_softmax(g, node)))
            continue
        try:
            result.attention_sites.append(explicit_site(g, node, len(result.attention_sites)))
        except NoMatch as miss:
            result.unmatched.append((g.node_name(node), miss.reason))
    return result

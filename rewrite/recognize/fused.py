"""Fused attention ops: one row per op family (:data:`FUSED_OPS`), each a handler from the node to a site."""
from __future__ import annotations

from typing import Any

from ..graph.base import GraphView
from ..sites import AttentionSite, MaskTerm, NoMatch
from .common import Spelling, fail, kind_of, users_desc
from .layout import trace_layout
from .masks import site_mask


def _mask_term(g: GraphView, value: Any) -> list[MaskTerm]:
    return [] if value is None else [MaskTerm(value, "keep" if g.dtype(value) == "bool" else "add")]


def sdpa_site(g: GraphView, node: Any, index: int) -> AttentionSite:
    canon = g.canon(node)
    q, k, v, mask = canon.inputs
    if canon.attrs["dropout"] > 0:
        raise fail(g, node, "dropout_p = 0", f"dropout_p = {canon.attrs['dropout']}")
    q_shape, k_shape = g.shape(q), g.shape(k)
    if q_shape is None or len(q_shape) != 4:
        raise fail(g, node, "4-D (B, H, S, D) query", f"shape {q_shape}")
    head_dim = q_shape[-1] if isinstance(q_shape[-1], int) else None
    scale = canon.attrs["scale"]
    if scale is None:
        if head_dim is None:
            raise fail(g, node, "a static head dim (for the default scale)", f"shape {q_shape}")
        scale = head_dim ** -0.5
    kind, terms = site_mask(g, _mask_term(g, mask), canon.attrs["causal"], anchor=node,
                            lengths=(q_shape[-2], k_shape[-2] if k_shape else None))
    tk = None
    try:
        tk = trace_layout(g, k, ["X0", "X1", "T", "F"], "K", node)
    except NoMatch:
        pass
    heads = q_shape[1] if isinstance(q_shape[1], int) else None
    kv_heads = k_shape[1] if k_shape and isinstance(k_shape[1], int) else heads
    if tk is not None and tk.kv_heads:
        kv_heads = tk.kv_heads
    output = g.outputs(node)[0]
    if canon.attrs.get("returns_tuple"):
        getters = [u for u in g.users(output) if kind_of(g, u) == "identity"]
        if len(getters) != 1:
            raise fail(g, node, "only the attention output used", f"users: {users_desc(g, output)}")
        output = getters[0]
    return AttentionSite(
        name=f"attn{index}", spelling=f"sdpa-{g.kind}", q=q, k=k, v=v, output=output, scale=float(scale),
        causal=canon.attrs["causal"] or kind in ("causal", "causal+padding"), mask=kind, heads=heads,
        kv_heads=kv_heads, head_dim=head_dim, layout="BHSD", mask_terms=terms,
        dtype=g.dtype(q), anchor=node, nodes=[g.node_name(node)])


def mha_native_site(g: GraphView, node: Any, index: int) -> AttentionSite:
    canon = g.canon(node)
    attrs = canon.attrs
    heads = attrs["heads"]
    embed = attrs["embed"]
    if attrs["need_weights"]:
        raise fail(g, node, "need_weights=False", "attention weights requested")
    return AttentionSite(name=f"attn{index}", spelling="mha-native", q=canon.inputs[0], k=canon.inputs[1],
                         v=canon.inputs[2], output=g.outputs(node)[0], scale=(embed // heads) ** -0.5,
                         causal=False, mask="none" if attrs["mask"] is None else "key_padding", heads=heads,
                         kv_heads=heads, head_dim=embed // heads, layout="BSE", anchor=node,
                         nodes=[g.node_name(node)])


def _packed_site(g: GraphView, node: Any, index: int, mask_input: int, hidden: Any) -> AttentionSite:
    """A fused op over packed (B, S, E) hidden states: reported (layout ``BSE``), not rewritten."""
    canon = g.canon(node)
    attrs = canon.attrs
    heads = attrs.get("num_heads") or attrs.get("q_num_heads")
    kv_heads = attrs.get("kv_num_heads") or heads
    causal = bool(attrs.get("unidirectional", 0) or attrs.get("is_causal", 0))
    head_dim = hidden // heads if isinstance(hidden, int) and heads else None
    scale = attrs.get("scale") or (head_dim ** -0.5 if head_dim else None)
    if scale is None:
        raise fail(g, node, "a scale attribute or a static hidden size (for the default scale 1/√head_dim)",
                   f"no scale and hidden size {hidden!r} for {heads} heads")
    masked = len(canon.inputs) > mask_input and canon.inputs[mask_input] is not None
    mask = ("causal+padding" if causal else "key_padding") if masked else ("causal" if causal else "none")
    return AttentionSite(name=f"attn{index}", spelling=canon.kind, q=canon.inputs[0],
                         k=canon.inputs[1] if len(canon.inputs) > 1 else None,
                         v=canon.inputs[2] if len(canon.inputs) > 2 else None, output=g.outputs(node)[0],
                         scale=float(scale), causal=causal, mask=mask, heads=heads, kv_heads=kv_heads,
                         head_dim=head_dim, layout="BSE", anchor=node, nodes=[g.node_name(node)],
                         dtype=g.dtype(canon.inputs[0]))


def _last_dim(g: GraphView, value: Any) -> Any:
    shape = g.shape(value)
    return shape[-1] if shape else None


def ort_attention_site(g: GraphView, node: Any, index: int) -> AttentionSite:
    wshape = g.shape(g.canon(node).inputs[1])
    hidden = wshape[-1] // 3 if wshape and isinstance(wshape[-1], int) else None
    return _packed_site(g, node, index, 3, hidden)


def ort_mha_site(g: GraphView, node: Any, index: int) -> AttentionSite:
    return _packed_site(g, node, index, 4, _last_dim(g, g.canon(node).inputs[0]))


def onnx_attention_site(g: GraphView, node: Any, index: int) -> AttentionSite:
    canon = g.canon(node)
    attrs = canon.attrs
    if attrs.get("softcap", 0.0):
        raise fail(g, node, "softcap = 0 (plain softmax)", f"softcap = {attrs['softcap']}")
    if any(g.users(o) or g.is_graph_output(o) for o in g.outputs(node)[1:]):
        raise fail(g, node, "only the attention output used", "present key/value or QK outputs are used")
    if len(canon.inputs) > 4 and any(v is not None for v in canon.inputs[4:6]):
        raise fail(g, node, "no past key/value (KV cache)", "past_key/past_value inputs")
    q_shape = g.shape(canon.inputs[0])
    if q_shape is None or len(q_shape) != 4:  # 3-D packed form
        return _packed_site(g, node, index, 3, q_shape[-1] if q_shape else None)
    causal = bool(attrs.get("unidirectional", 0) or attrs.get("is_causal", 0))
    heads, head_dim = q_shape[1], q_shape[-1]
    kshape = g.shape(canon.inputs[1])
    kv_heads = kshape[1] if kshape else heads
    mask_value = canon.inputs[3] if len(canon.inputs) > 3 else None
    kind, terms = site_mask(g, _mask_term(g, mask_value), causal, anchor=node,
                            lengths=(q_shape[-2], kshape[-2] if kshape and len(kshape) == 4 else None))
    scale = attrs.get("scale") or (head_dim ** -0.5 if isinstance(head_dim, int) else None)
    if scale is None:
        raise fail(g, node, "a static head dim (for the default scale)", f"shape {q_shape}")
    return AttentionSite(name=f"attn{index}", spelling="onnx_attention", q=canon.inputs[0], k=canon.inputs[1],
                         v=canon.inputs[2], output=g.outputs(node)[0], scale=float(scale),
                         causal=causal or kind in ("causal", "causal+padding"), mask=kind, heads=heads,
                         kv_heads=kv_heads, head_dim=head_dim, layout="BHSD", mask_terms=terms, anchor=node,
                         nodes=[g.node_name(node)], dtype=g.dtype(canon.inputs[0]))


#: One row per fused attention op family: the canonical kind, what is accepted, and the site builder.
FUSED_OPS: tuple[Spelling, ...] = (
    Spelling("fused", ("sdpa",), "sdpa", "aten scaled_dot_product_attention (4-D q, dropout_p = 0; mask kind "
             "from the mask's provenance; GQA read through repeat_kv)", sdpa_site),
    Spelling("fused", ("mha_native",), "mha-native", "aten _native_multi_head_attention, need_weights=False "
             "(packed, reported only)", mha_native_site),
    Spelling("fused", ("onnx_attention",), "onnx-attention", "ai.onnx Attention (opset 23), softcap = 0, no KV "
             "cache, only the first output used; 4-D rewritten, 3-D reported", onnx_attention_site),
    Spelling("fused", ("ort_attention",), "ort-attention", "com.microsoft Attention (packed QKV weights, reported "
             "only)", ort_attention_site),
    Spelling("fused", ("ort_mha",), "ort-mha", "com.microsoft MultiHeadAttention (3-D, reported only)",
             ort_mha_site),
)
FUSED_BY_KIND = {kind: row for row in FUSED_OPS for kind in row.kinds}


def fused_site(g: GraphView, node: Any, index: int) -> AttentionSite:
    return FUSED_BY_KIND[g.canon(node).kind].handler(g, node, index)

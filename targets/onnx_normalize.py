"""Normalize an ONNX model before TVM's ONNX frontend.

TVM's ONNX frontend looks converters up by ``op_type`` only: ``Attention`` is always converted with
``com.microsoft`` semantics (an ``ai.onnx`` opset-23 ``Attention`` would be mis-converted) and
``MultiHeadAttention`` / ``GroupQueryAttention`` have no converter.  :func:`normalize_onnx` therefore expands

* ``com.microsoft::Attention`` (packed QKV weights, optional bias, 2-D key mask, ``unidirectional``, ``scale``),
* ``com.microsoft::MultiHeadAttention`` (separate 3-D Q/K/V, optional packed bias, 2-D key padding mask,
  attention bias, ``unidirectional``, ``scale``),
* ``ai.onnx::Attention`` (opset 23: 3-D or 4-D Q/K/V, GQA, bool/float ``attn_mask``, ``is_causal``, ``scale``),

into explicit MatMul / Softmax / Add / Transpose / Reshape ops, turns ``Dropout`` into ``Identity`` (inference), and
asserts that no fused attention op remains.  Unsupported variants (past key/value, packed KV, softcap, extra
outputs) raise :class:`targets.errors.UnsupportedOpError` naming the node.  The input model is never modified.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import UnsupportedOpError

log = logging.getLogger(__name__)

FUSED_ATTENTION = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                   "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention"}
_NEG = float(np.finfo(np.float32).min)


class _Builder:
    """Emits nodes with unique names into a list; small helpers for constants."""

    def __init__(self, graph: onnx.GraphProto, prefix: str):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.prefix = prefix
        self.n = 0
        self.graph = graph

    def name(self, tag: str) -> str:
        self.n += 1
        return f"{self.prefix}/{tag}_{self.n}"

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        outs = [self.name(op_type) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type + "_node"), **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype=np.float32) -> str:
        name = self.name("const")
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _inp(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if len(node.input) > i and node.input[i] else ""


def _split_heads(b: _Builder, x: str, heads: int) -> str:
    """(B, S, H*dh) -> (B, H, S, dh)."""
    r = b.op("Reshape", [x, b.const([0, 0, heads, -1], np.int64)])
    return b.op("Transpose", [r], perm=[0, 2, 1, 3])


def _merge_heads(b: _Builder, x: str) -> str:
    """(B, H, S, dh) -> (B, S, H*dh)."""
    t = b.op("Transpose", [x], perm=[0, 2, 1, 3])
    return b.op("Reshape", [t, b.const([0, 0, -1], np.int64)])


def _inv_sqrt_last_dim(b: _Builder, x: str) -> str:
    """Scalar 1/sqrt(x.shape[-1]) as a float tensor (constant-folded by the frontend when static)."""
    shp = b.op("Shape", [x])
    last = b.op("Gather", [shp, b.const(-1, np.int64)], axis=0)
    f = b.op("Cast", [last], to=TensorProto.FLOAT)
    return b.op("Reciprocal", [b.op("Sqrt", [f])])


def _causal_bias(b: _Builder, scores: str) -> str:
    """Upper-left aligned causal additive bias (S, L): 0 where col <= row, float32 min elsewhere."""
    shp = b.op("Shape", [scores])
    s = b.op("Gather", [shp, b.const(-2, np.int64)], axis=0)
    l_ = b.op("Gather", [shp, b.const(-1, np.int64)], axis=0)
    zero, one = b.const(0, np.int64), b.const(1, np.int64)
    rows = b.op("Unsqueeze", [b.op("Range", [zero, s, one]), b.const([1], np.int64)])
    cols = b.op("Unsqueeze", [b.op("Range", [zero, l_, one]), b.const([0], np.int64)])
    future = b.op("Greater", [cols, rows])
    return b.op("Where", [future, b.const(_NEG), b.const(0.0)])


def _key_mask_bias(b: _Builder, mask: str, filter_value: float) -> str:
    """2-D (B, L) key mask of 1 (keep) / 0 (mask) -> additive (B, 1, 1, L) bias."""
    keep = b.op("Cast", [mask], to=TensorProto.FLOAT)
    inv = b.op("Sub", [b.const(1.0), keep])
    bias = b.op("Mul", [inv, b.const(filter_value)])
    return b.op("Unsqueeze", [bias, b.const([1, 2], np.int64)])


def _scale(b: _Builder, scale, head_dim: int | None, q: str) -> str:
    """Explicit scale, else 1/sqrt(head_dim) as a constant (dynamic Shape-based fallback when unknown)."""
    if scale:
        return b.const(float(scale))
    if head_dim:
        return b.const(1.0 / np.sqrt(head_dim))
    return _inv_sqrt_last_dim(b, q)


def _attend(b: _Builder, q: str, k: str, v: str, scale: str, biases: list[str], causal: bool,
            s_len: int | None = None, l_len: int | None = None) -> str:
    """softmax((q*scale) @ k^T + biases [+ causal]) @ v with q, k, v in (B, H, S, d).

    This expands an ONNX / onnxruntime op, so it keeps that op's semantics rather than the engine's canonical form
    (:func:`rewrite.attention_math.softmax_attention`): causal is top-left aligned (``causal_align="top_left"``
    there), and masks are additive (``finfo.min`` or the op's ``mask_filter_value``), so a fully masked row is the
    uniform average onnxruntime computes, where the canonical form gives 0. Rows with a kept key agree.
    The causal bias is a constant when the sequence lengths are known, else built with Range (dynamic).
    """
    qs = b.op("Mul", [q, scale])
    scores = b.op("MatMul", [qs, b.op("Transpose", [k], perm=[0, 1, 3, 2])])
    for bias in biases:
        scores = b.op("Add", [scores, bias])
    if causal and s_len and l_len:
        bias = np.where(np.triu(np.ones((s_len, l_len), bool), 1), _NEG, 0.0).astype(np.float32)
        scores = b.op("Add", [scores, b.const(bias)])
    elif causal:
        scores = b.op("Add", [scores, _causal_bias(b, scores)])
    probs = b.op("Softmax", [scores], axis=-1)
    return b.op("MatMul", [probs, v])


def _check_outputs(node: onnx.NodeProto, used: set[str], allowed: int) -> None:
    for i, o in enumerate(node.output):
        if i >= allowed and o and o in used:
            raise UnsupportedOpError(f"{node.op_type}: output {i} ({o}) is used; only the attention output is "
                                     "supported", culprit=node.name or node.output[0])


def _expand_ms_attention(node, b: _Builder, used: set[str]) -> None:
    a = _attrs(node)
    culprit = node.name or node.output[0]
    if _inp(node, 4) or _inp(node, 6) or a.get("past_present_share_buffer") or a.get("do_rotary"):
        raise UnsupportedOpError("com.microsoft Attention with past state or rotary is not supported", culprit)
    _check_outputs(node, used, 1)
    heads = int(a["num_heads"])
    sizes = list(a.get("qkv_hidden_sizes", []))
    qkv = b.op("MatMul", [node.input[0], node.input[1]])
    if _inp(node, 2):
        qkv = b.op("Add", [qkv, node.input[2]])
    if sizes:
        q, k, v = b.op("Split", [qkv, b.const(sizes, np.int64)], n_out=3, axis=-1)
    else:
        q, k, v = b.op("Split", [qkv], n_out=3, axis=-1, num_outputs=3) if _opset(b.graph) >= 18 else \
            b.op("Split", [qkv], n_out=3, axis=-1)
    q, k, v = (_split_heads(b, t, heads) for t in (q, k, v))
    wdim = _last_dim(b.graph, node.input[1])
    head_dim = (sizes[0] // heads) if sizes else (wdim // 3 // heads if wdim else None)
    scale = _scale(b, a.get("scale"), head_dim, q)
    seq = _dim(b.graph, node.input[0], 1) if _rank_of(b.graph, node.input[0]) == 3 else None
    biases = []
    mask = _inp(node, 3)
    if mask:
        rank = _rank_of(b.graph, mask)
        if rank != 2:
            raise UnsupportedOpError(f"com.microsoft Attention mask_index of rank {rank} (only 2-D key masks)",
                                     culprit)
        biases.append(_key_mask_bias(b, mask, float(a.get("mask_filter_value", -10000.0))))
    if _inp(node, 5):
        biases.append(node.input[5])
    out = _attend(b, q, k, v, scale, biases, bool(a.get("unidirectional", 0)), seq, seq)
    b.nodes.append(helper.make_node("Identity", [_merge_heads(b, out)], [node.output[0]], name=b.name("out")))


def _expand_ms_mha(node, b: _Builder, used: set[str]) -> None:
    a = _attrs(node)
    culprit = node.name or node.output[0]
    if not _inp(node, 1) or not _inp(node, 2) or _inp(node, 6) or _inp(node, 7):
        raise UnsupportedOpError("com.microsoft MultiHeadAttention with packed QKV/KV or past state is not "
                                 "supported", culprit)
    for t in node.input[:3]:
        if _rank_of(b.graph, t) not in (3, None):
            raise UnsupportedOpError("MultiHeadAttention with non 3-D query/key/value", culprit)
    _check_outputs(node, used, 1)
    heads = int(a["num_heads"])
    q, k, v = node.input[0], node.input[1], node.input[2]
    dq = _last_dim(b.graph, q)
    head_dim = dq // heads if dq else None
    s_len, l_len = _dim(b.graph, q, 1), _dim(b.graph, k, 1)
    if _inp(node, 3):  # packed bias (Dq + Dk + Dv)
        dq, dk = _last_dim(b.graph, q), _last_dim(b.graph, k)
        dv = _last_dim(b.graph, v)
        if None in (dq, dk, dv):
            raise UnsupportedOpError("MultiHeadAttention bias needs static hidden sizes", culprit)
        bq, bk, bv = b.op("Split", [node.input[3], b.const([dq, dk, dv], np.int64)], n_out=3, axis=0)
        q, k, v = b.op("Add", [q, bq]), b.op("Add", [k, bk]), b.op("Add", [v, bv])
    q, k, v = (_split_heads(b, t, heads) for t in (q, k, v))
    scale = _scale(b, a.get("scale"), head_dim, q)
    biases = []
    if _inp(node, 4):
        rank = _rank_of(b.graph, node.input[4])
        if rank != 2:
            raise UnsupportedOpError(f"MultiHeadAttention key_padding_mask of rank {rank} (only 2-D)", culprit)
        biases.append(_key_mask_bias(b, node.input[4], float(a.get("mask_filter_value", -10000.0))))
    if _inp(node, 5):
        biases.append(node.input[5])
    out = _attend(b, q, k, v, scale, biases, bool(a.get("unidirectional", 0)), s_len, l_len)
    b.nodes.append(helper.make_node("Identity", [_merge_heads(b, out)], [node.output[0]], name=b.name("out")))


def _expand_onnx_attention(node, b: _Builder, used: set[str]) -> None:
    a = _attrs(node)
    culprit = node.name or node.output[0]
    if _inp(node, 4) or _inp(node, 5) or a.get("softcap", 0.0):
        raise UnsupportedOpError("ai.onnx Attention with past key/value or softcap is not supported", culprit)
    _check_outputs(node, used, 1)
    q, k, v = node.input[0], node.input[1], node.input[2]
    rank = _rank_of(b.graph, q)
    three_d = rank == 3
    if three_d:
        dq = _last_dim(b.graph, q)
        head_dim = dq // int(a["q_num_heads"]) if dq else None
        s_len, l_len = _dim(b.graph, q, 1), _dim(b.graph, k, 1)
    elif rank == 4:
        head_dim, s_len, l_len = _dim(b.graph, q, 3), _dim(b.graph, q, 2), _dim(b.graph, k, 2)
    else:
        head_dim = s_len = l_len = None
    if three_d:
        hq, hkv = int(a["q_num_heads"]), int(a["kv_num_heads"])
        q, k, v = _split_heads(b, q, hq), _split_heads(b, k, hkv), _split_heads(b, v, hkv)
    else:
        hq, hkv = _dim(b.graph, q, 1), _dim(b.graph, k, 1)
    if hq is not None and hkv is not None and hq != hkv:  # GQA: repeat each KV head hq/hkv times
        if hq % hkv:
            raise UnsupportedOpError(f"Attention: q heads {hq} not a multiple of kv heads {hkv}", culprit)
        idx = b.const([h // (hq // hkv) for h in range(hq)], np.int64)
        k, v = b.op("Gather", [k, idx], axis=1), b.op("Gather", [v, idx], axis=1)
    scale = _scale(b, a.get("scale"), head_dim, q)
    biases = []
    mask = _inp(node, 3)
    if mask:
        if _elem_type(b.graph, mask) == TensorProto.BOOL:
            biases.append(b.op("Where", [mask, b.const(0.0), b.const(_NEG)]))
        else:
            biases.append(mask)
    out = _attend(b, q, k, v, scale, biases, bool(a.get("is_causal", 0)), s_len, l_len)
    if three_d:
        out = _merge_heads(b, out)
    b.nodes.append(helper.make_node("Identity", [out], [node.output[0]], name=b.name("out")))


# --- graph type helpers ------------------------------------------------------------------------------------------
_TYPES: dict[int, dict[str, onnx.TypeProto]] = {}


def _types(graph: onnx.GraphProto) -> dict[str, onnx.TypeProto]:
    return _TYPES.get(id(graph), {})


def _rank_of(graph, name: str) -> int | None:
    t = _types(graph).get(name)
    if t is None or not t.tensor_type.HasField("shape"):
        return None
    return len(t.tensor_type.shape.dim)


def _dim(graph, name: str, i: int) -> int | None:
    t = _types(graph).get(name)
    if t is None or not t.tensor_type.HasField("shape"):
        return None
    d = t.tensor_type.shape.dim[i]
    return int(d.dim_value) if d.HasField("dim_value") else None


def _last_dim(graph, name: str) -> int | None:
    r = _rank_of(graph, name)
    return None if r is None else _dim(graph, name, r - 1)


def _elem_type(graph, name: str) -> int | None:
    t = _types(graph).get(name)
    return None if t is None else t.tensor_type.elem_type


def _opset(graph) -> int:
    return _OPSET.get(id(graph), 17)


_OPSET: dict[int, int] = {}


def default_opset(model: onnx.ModelProto) -> int:
    """The ai.onnx opset version of a model."""
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 1


def _fix_scalar_axes(g: onnx.GraphProto) -> int:
    """TVM's Unsqueeze/Squeeze converters need 1-D ``axes``; exporters may emit a 0-d constant.  Returns fixes."""
    consts = {i.name: i for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = n.attribute[0].t
    fixed, added = 0, {}
    for n in g.node:
        if n.op_type in ("Unsqueeze", "Squeeze") and len(n.input) > 1 and n.input[1] in consts:
            t = consts[n.input[1]]
            if len(t.dims) == 0:
                name = n.input[1] + "__1d"
                if name not in added:
                    added[name] = numpy_helper.from_array(numpy_helper.to_array(t).reshape(1), name)
                n.input[1] = name
                fixed += 1
    g.initializer.extend(added.values())
    return fixed


def normalize_onnx(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of ``model`` with fused attention ops expanded and Dropout removed (see module docstring).

    Raises UnsupportedOpError for variants that cannot be expanded, or when a fused attention op remains.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(out, strict_mode=False)
    except Exception:  # noqa: BLE001 - shape inference is best effort (contrib ops)
        inferred = out
    g = out.graph
    types = {vi.name: vi.type for vi in list(inferred.graph.value_info) + list(inferred.graph.input)
             + list(inferred.graph.output)}
    for init in g.initializer:
        types[init.name] = helper.make_tensor_type_proto(init.data_type, list(init.dims))
    _TYPES[id(g)] = types
    _OPSET[id(g)] = default_opset(out)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    expanded = 0
    try:
        for idx, node in enumerate(g.node):
            dom = node.domain or ""
            b = _Builder(g, f"softswap_norm{idx}")
            if node.op_type == "Attention" and dom == "com.microsoft":
                _expand_ms_attention(node, b, used)
            elif node.op_type == "MultiHeadAttention" and dom == "com.microsoft":
                _expand_ms_mha(node, b, used)
            elif node.op_type == "Attention" and dom in ("", "ai.onnx"):
                _expand_onnx_attention(node, b, used)
            elif node.op_type == "Dropout" and dom in ("", "ai.onnx"):
                if len(node.output) > 1 and node.output[1] in used:
                    raise UnsupportedOpError("Dropout mask output is used", node.name or node.output[0])
                new_nodes.append(helper.make_node("Identity", [node.input[0]], [node.output[0]],
                                                  name=(node.name or "dropout") + "/identity"))
                continue
            else:
                new_nodes.append(node)
                continue
            expanded += 1
            new_nodes += b.nodes
            new_inits += b.inits
    finally:
        _TYPES.pop(id(g), None)
        _OPSET.pop(id(g), None)
    del g.node[:]
    g.node.extend(new_nodes)
    g.initializer.extend(new_inits)
    _fix_scalar_axes(g)
    left = [n for n in g.node if n.op_type in FUSED_ATTENTION]
    if left:
        n = left[0]
        raise UnsupportedOpError(f"fused attention op {n.domain or 'ai.onnx'}::{n.op_type} cannot be expanded",
                                 culprit=n.name or n.output[0])
    if expanded and default_opset(out) < 13:
        raise UnsupportedOpError("expanding attention needs ai.onnx opset >= 13", culprit="opset_import")
    log.info("onnx normalize: %d attention op(s) expanded", expanded)
    return out

"""Fused attention ops in ONNX graphs: com.microsoft Attention / MultiHeadAttention and ai.onnx opset-23 Attention
are recognized into sites with the right fields; opset-23 Attention (B, H, S, D) is rewritten and the reference
rewrite matches onnxruntime's own Attention kernel."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import rewrite
from rewrite.errors import NoSitesError
from rewrite.verify import run
from rewrite.io import load_onnx

B, S, H, D = 2, 8, 4, 8
E = H * D


def _save(tmp_path, graph, opsets, name):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = 10
    path = tmp_path / name
    onnx.save(model, path)
    return path


def _opset23(tmp_path, causal: bool, mask: str | None, scale: float | None = None):
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [B, H, S, D]) for n in "qkv"]
    names = ["q", "k", "v"]
    if mask == "bool":
        inputs.append(helper.make_tensor_value_info("m", TensorProto.BOOL, [B, 1, S, S]))
        names.append("m")
    attrs = {"is_causal": int(causal)}
    if scale is not None:
        attrs["scale"] = scale
    node = helper.make_node("Attention", names, ["y"], **attrs)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, H, S, D])])
    return _save(tmp_path, graph, [("", 23)], "attn23.onnx")


@pytest.mark.parametrize("causal,mask,scale,kind", [(False, None, None, "none"), (True, None, 0.2, "causal"),
                                                    (False, "bool", None, "boolean")])
def test_opset23_attention(tmp_path, causal, mask, scale, kind):
    path = _opset23(tmp_path, causal, mask, scale)
    (site,) = rewrite.inspect(path).attention_sites
    assert (site.heads, site.kv_heads, site.head_dim, site.causal, site.mask) == (H, H, D, causal, kind)
    assert site.scale == pytest.approx(scale or D ** -0.5, rel=1e-6)
    loaded = load_onnx(path)
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((B, H, S, D)).astype(np.float32) for n in "qkv"}
    if mask:
        m = rng.random((B, 1, S, S)) > 0.3
        m[..., 0] = True
        feeds["m"] = m
    loaded.example_inputs = feeds
    loaded.extra["feeds"] = feeds
    new, report = rewrite.convert(loaded, attention="reference")
    assert report["fidelity"]["max_abs"] < 1e-5
    assert not [n for n in new.onnx.graph if n.op_type == "Attention"]


def test_com_microsoft_attention_is_recognized_not_rewritten(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, S, E])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, S, E])
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((E, 3 * E)).astype(np.float32), "w")
    bias = numpy_helper.from_array(np.zeros(3 * E, np.float32), "b")
    node = helper.make_node("Attention", ["x", "w", "b"], ["y"], domain="com.microsoft", num_heads=H,
                            unidirectional=1)
    path = _save(tmp_path, helper.make_graph([node], "g", [x], [y], [w, bias]),
                 [("", 17), ("com.microsoft", 1)], "ort_attention.onnx")
    (site,) = rewrite.inspect(path).attention_sites
    assert (site.spelling, site.heads, site.head_dim, site.causal, site.mask) == ("ort_attention", H, D, True, "causal")
    assert site.scale == pytest.approx(D ** -0.5)
    with pytest.raises(NoSitesError, match="fused op"):
        rewrite.convert(path, attention="linear")


def test_com_microsoft_multihead_attention(tmp_path):
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [B, S, E]) for n in ("q", "k", "v")]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, S, E])
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft", num_heads=H,
                            scale=0.3)
    path = _save(tmp_path, helper.make_graph([node], "g", ins, [y]), [("", 17), ("com.microsoft", 1)], "mha.onnx")
    (site,) = rewrite.inspect(path).attention_sites
    assert (site.spelling, site.heads, site.head_dim, site.causal, site.mask, site.scale) == \
        ("ort_mha", H, D, False, "none", pytest.approx(0.3))

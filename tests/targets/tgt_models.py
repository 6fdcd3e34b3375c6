"""Small models for the targets tests (built in-process; no files from the network)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper


def exec_targets() -> list:
    """CPU targets whose code the numeric tests execute: ``avx2``, ``avx512`` (marked ``avx512``: skipped on a host
    without AVX-512F) and ``host`` whenever it resolves to a target other than those two (on an AVX2-only machine
    it is the one AVX-512-free target besides avx2 that checks numbers; on a Zen 4 it equals avx512)."""
    from targets.cpu import has_avx512
    from targets.table import target_dict

    same = [target_dict("avx2")] + ([target_dict("avx512")] if has_avx512() else [])
    params = ["avx2", pytest.param("avx512", marks=pytest.mark.avx512)]
    return params + ([] if target_dict("host") in same else ["host"])


def host_lanes() -> int:
    """fp32 lanes of the widest vectors the ``host`` target uses (16 with AVX-512F, else 8)."""
    from targets.softmax_kernels import vector_bits_of
    from targets.table import get_target

    return vector_bits_of(get_target("host")) // 32


class SDPABlock(torch.nn.Module):
    """Self-attention block with SDPA; options: causal, bool key mask input, custom scale, GQA (kv heads)."""

    def __init__(self, dim=32, heads=4, kv_heads=None, causal=False, scale=None, bool_mask=False):
        super().__init__()
        self.h, self.kvh = heads, kv_heads or heads
        self.d = dim // heads
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * self.kvh * self.d)
        self.o = torch.nn.Linear(dim, dim)
        self.causal, self.scale, self.bool_mask = causal, scale, bool_mask

    def forward(self, x, mask=None):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.h, self.d).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.kvh, self.d).permute(2, 0, 3, 1, 4)
        kw = {"enable_gqa": True} if self.kvh != self.h else {}
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal, scale=self.scale, **kw)
        return self.o(a.transpose(1, 2).reshape(b, n, -1))


class LinearAttention(torch.nn.Module):
    """Katharopoulos linear attention, phi = elu + 1, with normalizer."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.o = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
        q, k = F.elu(q) + 1, F.elu(k) + 1
        kv = torch.einsum("bhnd,bhne->bhde", k, v)
        z = 1.0 / (torch.einsum("bhnd,bhd->bhn", q, k.sum(2)) + 1e-6)
        y = torch.einsum("bhnd,bhde,bhn->bhne", q, kv, z)
        return self.o(y.transpose(1, 2).reshape(b, n, -1))


def to_onnx(model: torch.nn.Module, args: tuple, input_names: list[str]) -> onnx.ModelProto:
    """torch.onnx.export(dynamo=True) into an in-memory ModelProto."""
    torch.manual_seed(0)
    prog = torch.onnx.export(model.eval(), args, dynamo=True, input_names=input_names, verbose=False)
    return prog.model_proto


def ms_attention_model(b=2, s=16, hidden=32, heads=4, mask=True, unidirectional=0) -> onnx.ModelProto:
    """com.microsoft Attention with packed QKV weights, bias and a 2-D key mask."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((hidden, 3 * hidden)) * 0.2).astype(np.float32), "w")
    bias = numpy_helper.from_array((rng.standard_normal(3 * hidden) * 0.1).astype(np.float32), "bias")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [b, s, hidden])]
    node_in = ["x", "w", "bias"]
    if mask:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.INT32, [b, s]))
        node_in.append("mask")
    node = helper.make_node("Attention", node_in, ["y"], domain="com.microsoft", num_heads=heads,
                            unidirectional=unidirectional, name="attn0")
    g = helper.make_graph([node], "ms_attn", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                   [b, s, hidden])], [w, bias])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def ms_mha_model(b=2, s=16, l_=24, hidden=32, heads=4) -> onnx.ModelProto:
    """com.microsoft MultiHeadAttention with separate Q/K/V, packed bias and a key padding mask."""
    rng = np.random.default_rng(1)
    bias = numpy_helper.from_array((rng.standard_normal(3 * hidden) * 0.1).astype(np.float32), "bias")
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, [b, s, hidden]),
              helper.make_tensor_value_info("k", TensorProto.FLOAT, [b, l_, hidden]),
              helper.make_tensor_value_info("v", TensorProto.FLOAT, [b, l_, hidden]),
              helper.make_tensor_value_info("kpm", TensorProto.INT32, [b, l_])]
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v", "bias", "kpm"], ["y"], domain="com.microsoft",
                            num_heads=heads, name="mha0")
    g = helper.make_graph([node], "ms_mha", inputs,
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [b, s, hidden])], [bias])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def onnx23_attention_model(b=1, hq=4, hkv=2, s=16, d=8, causal=1, scale=0.3) -> onnx.ModelProto:
    """ai.onnx opset-23 Attention, 4-D inputs, GQA, causal, custom scale, bool mask."""
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, [b, hq, s, d]),
              helper.make_tensor_value_info("k", TensorProto.FLOAT, [b, hkv, s, d]),
              helper.make_tensor_value_info("v", TensorProto.FLOAT, [b, hkv, s, d]),
              helper.make_tensor_value_info("m", TensorProto.BOOL, [s, s])]
    node = helper.make_node("Attention", ["q", "k", "v", "m"], ["y"], is_causal=causal, scale=scale, name="att23")
    g = helper.make_graph([node], "onnx23", inputs,
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [b, hq, s, d])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])


def softmax_matmul_model(n=64) -> onnx.ModelProto:
    """Y = Softmax(X @ W) for the register checks."""
    rng = np.random.default_rng(2)
    w = numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["s"]), helper.make_node("Softmax", ["s"], ["y"], axis=-1)]
    g = helper.make_graph(nodes, "smm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, n, n])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, n, n])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def ort_run(model: onnx.ModelProto, feeds: dict) -> list:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def zoo_variant_onnx(onnx_path, feeds: dict, variant: str | None, out_path):
    """The zoo ONNX at ``onnx_path`` written to ``out_path``: as it is (``variant`` None) or with every attention
    site rewritten to ``variant``; ``feeds`` (arrays by input name) size the rewrite's site captures."""
    import rewrite
    from rewrite.io import load_onnx

    loaded = load_onnx(onnx_path)
    loaded.example_inputs, loaded.extra["feeds"] = feeds, feeds
    if variant is None:
        rewrite.export(loaded, out_path)
    else:
        rewrite.convert(loaded, out_path, attention=variant, verify=False)
    return out_path

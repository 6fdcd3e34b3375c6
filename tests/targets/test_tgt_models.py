"""Small attention models through import -> CPU pipeline -> VM, against onnxruntime / torch."""

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from targets.artifact import build
from targets.errors import TargetError, UnsupportedOpError
from targets.importer import import_model, import_onnx
from targets.pipeline import loop_report, scheduled_module
from targets.table import get_target

from tgt_models import (LinearAttention, SDPABlock, exec_targets, ms_attention_model, ms_mha_model,
                        onnx23_attention_model, ort_run, to_onnx)


def _tvm_run(imported, target, feeds):
    ex = build(imported, target)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(feeds[i["name"]]) for i in imported.inputs])
    return [o.numpy() for o in ([out] if hasattr(out, "numpy") else list(out))]


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 32, generator=g)
    mask = torch.rand(2, 1, 16, 16, generator=g) > 0.3
    mask[..., 0] = True
    return x, mask


BLOCKS = {
    "sdpa": lambda: (SDPABlock(), 1),
    "causal_scale_gqa": lambda: (SDPABlock(kv_heads=2, causal=True, scale=0.3), 1),
    "bool_mask": lambda: (SDPABlock(), 2),
    "linear": lambda: (LinearAttention(), 1),
}


@pytest.fixture(scope="module", params=sorted(BLOCKS))
def onnx_block(request):
    torch.manual_seed(0)
    model, nargs = BLOCKS[request.param]()
    args = _inputs()[:nargs]
    names = ["x", "mask"][:nargs]
    proto = to_onnx(model, args, names)
    feeds = {n: a.numpy() for n, a in zip(names, args)}
    return request.param, model, args, proto, feeds


@pytest.mark.parametrize("target", exec_targets())
def test_onnx_blocks_match_ort(onnx_block, target):
    _, _, _, proto, feeds = onnx_block
    ref = ort_run(proto, feeds)[0]
    out = _tvm_run(import_onnx(proto), target, feeds)[0]
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_torch_export_blocks_match_torch(onnx_block):
    _, model, args, _, _ = onnx_block
    ep = torch.export.export(model.eval(), args)
    imp = import_model(ep)
    feeds = {i["name"]: a.numpy() for i, a in zip(imp.inputs, args)}
    out = _tvm_run(imp, "host", feeds)[0]
    np.testing.assert_allclose(out, model(*args).detach().numpy(), atol=1e-4, rtol=1e-4)


def _feeds(proto, rng):
    feeds = {}
    for vi in proto.graph.input:
        shp = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        et = vi.type.tensor_type.elem_type
        if et == 1:
            feeds[vi.name] = rng.standard_normal(shp).astype(np.float32)
        elif et == 6:
            m = np.ones(shp, np.int32)
            m[:, -3:] = 0
            feeds[vi.name] = m
        elif et == 9:
            feeds[vi.name] = np.tril(np.ones(shp, bool)) | (rng.random(shp) > 0.5)
    return feeds


@pytest.mark.parametrize("build_model", [ms_attention_model, lambda: ms_attention_model(mask=False, unidirectional=1),
                                         ms_mha_model, onnx23_attention_model],
                         ids=["ms_attention", "ms_attention_causal", "ms_mha", "onnx23_attention"])
@pytest.mark.parametrize("target", exec_targets())
def test_fused_attention_expanded(build_model, target, rng):
    proto = build_model()
    feeds = _feeds(proto, rng)
    imp = import_onnx(proto)
    names = {c for c in imp.mod.script().split() if "attention" in c.lower()}
    assert not names, names
    out = _tvm_run(imp, target, feeds)[0]
    np.testing.assert_allclose(out, ort_run(proto, feeds)[0], atol=1e-4, rtol=1e-4)


def test_ms_attention_with_past_is_typed_error():
    proto = ms_attention_model()
    proto.graph.node[0].input.extend(["past"])
    with pytest.raises(UnsupportedOpError) as ei:
        import_onnx(proto)
    assert ei.value.culprit == "attn0"


def test_unsupported_op_names_node():
    from onnx import TensorProto, helper

    node = helper.make_node("NoSuchOp", ["x"], ["y"], name="weird0", domain="example.org")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.org", 1)])
    with pytest.raises(TargetError) as ei:
        import_onnx(proto)
    assert ei.value.culprit == "weird0"


def test_every_loop_nest_scheduled(onnx_block):
    name, _, _, proto, _ = onnx_block
    mod = scheduled_module(import_onnx(proto).mod, get_target("avx512"))
    rep = loop_report(mod)
    assert rep
    for fname, info in rep.items():
        if info["work"] >= 4096:
            assert info["parallel"] and info["vectorized"], (name, fname, info)


def test_single_row_softmax_compiles_fast():
    from onnx import TensorProto, helper
    import time

    node = helper.make_node("Softmax", ["x"], ["y"], axis=-1)
    g = helper.make_graph([node], "sm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 262144])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 262144])])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    t = time.perf_counter()
    x = np.random.default_rng(0).standard_normal((1, 262144)).astype(np.float32)
    out = _tvm_run(import_onnx(proto), "host", {"x": x})[0]
    assert time.perf_counter() - t < 30
    np.testing.assert_allclose(out, ort_run(proto, {"x": x})[0], atol=1e-7)


def test_linalg_inv_is_typed_error_naming_node():
    class Inv(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.inv(x)

    ep = torch.export.export(Inv(), (torch.eye(4) * 2,))
    with pytest.raises(UnsupportedOpError) as ei:
        import_model(ep)
    assert "linalg" in ei.value.culprit


@pytest.mark.parametrize("target", exec_targets())
@pytest.mark.parametrize("k", [64, 256], ids=["k64", "k256_packed"])
def test_matmul_rule_with_epilogue(target, k, rng):
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(rng.standard_normal((k, 96)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(96).astype(np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["a"]),
             helper.make_node("Relu", ["a"], ["y"])]
    g = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64, 96])], [w, b])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((2, 64, k)).astype(np.float32)
    imp = import_onnx(proto)
    rep = loop_report(scheduled_module(imp.mod, get_target(target)))
    assert all(i["parallel"] and i["vectorized"] for i in rep.values()), rep
    out = _tvm_run(imp, target, {"x": x})[0]
    np.testing.assert_allclose(out, ort_run(proto, {"x": x})[0], atol=1e-4, rtol=1e-4)


def test_unrouted_single_row_softmax_skips_dlight_reduction():
    """With the hand kernels off, a (1, N) softmax must not go through dl.cpu.Reduction (O(N^2), pitfall 5)."""
    import time

    from onnx import TensorProto, helper

    from targets.cpu_rules import GuardedReduction, cpu_rules
    from targets.pipeline import cpu_pipeline

    assert not any(type(r).__name__ == "GEMV" for r in cpu_rules())
    node = helper.make_node("Softmax", ["x"], ["y"], axis=-1)
    g = helper.make_graph([node], "sm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 65536])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 65536])])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    tgt = get_target("host")
    mod = import_onnx(proto).mod
    with tgt:
        legal = tvm.transform.Sequential([relax.transform.FastMathTransform(), relax.transform.LegalizeOps(),
                                          relax.transform.AnnotateTIROpPattern(), relax.transform.FuseOps(),
                                          relax.transform.FuseTIR()])(mod)
    prims = [f for _, f in legal.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert prims and all(GuardedReduction().apply(f, tgt, False) is None for f in prims)
    t = time.perf_counter()
    ex = tvm.compile(mod, target=tgt, relax_pipeline=cpu_pipeline(tgt, route_softmax=False))
    x = np.random.default_rng(1).standard_normal((1, 65536)).astype(np.float32)
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    assert time.perf_counter() - t < 60
    np.testing.assert_allclose(out, ort_run(proto, {"x": x})[0], atol=1e-6)

"""K-split (parallel reduction) schedule of long-K small-output matmuls (φ(K)ᵀV of linear attention): partial sums
over K chunks plus a vectorized sum, against numpy (float64), with and without an epilogue; reductions the K-split
does not take (K not a multiple of the chunk, short K) keep the tiled schedule and the same numbers."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from targets.bench import tvm_callable
from targets.cpu_rules import KSPLIT_CHUNK, KSPLIT_MIN_K
from targets.importer import import_onnx
from targets.pipeline import scheduled_module
from targets.table import get_target

from tgt_models import exec_targets


def _kv_model(h: int, n: int, d: int, e: int, scale: float | None = None):
    """y = einsum('bhnd,bhne->bhde', k, v) (times a constant ``scale`` when given: an epilogue)."""
    nodes = [helper.make_node("Einsum", ["k", "v"], ["kv"], equation="bhnd,bhne->bhde")]
    inits = []
    if scale is not None:
        nodes.append(helper.make_node("Mul", ["kv", "s"], ["y"]))
        inits.append(numpy_helper.from_array(np.array(scale, np.float32), "s"))
    else:
        nodes[0].output[0] = "y"
    g = helper.make_graph(nodes, "kv", [helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, h, n, d]),
                                        helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, h, n, e])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, h, d, e])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _rf_kernels(model) -> list[str]:
    mod = scheduled_module(import_onnx(model).mod, get_target("avx2"))
    return [f.script() for _, f in mod.functions_items() if "_rf" in f.script()]


@pytest.mark.parametrize("target", exec_targets())
@pytest.mark.parametrize("h,n,d,e,scale", [(2, 4096, 64, 64, None),      # K-split, 16 chunks
                                           (3, 2560, 32, 48, 0.125),     # K-split with an epilogue, 48 columns
                                           (2, 2050, 64, 64, None),      # K not a multiple of the chunk: tiled
                                           (2, 512, 64, 64, 2.0)])       # short K: tiled
def test_long_k_matmul_matches_numpy(target, h, n, d, e, scale, rng):
    model = _kv_model(h, n, d, e, scale)
    k = rng.standard_normal((1, h, n, d)).astype(np.float32)
    v = rng.standard_normal((1, h, n, e)).astype(np.float32)
    out = tvm_callable(model, target, {"k": k, "v": v})()
    got = (out if hasattr(out, "numpy") else out[0]).numpy()
    want = np.einsum("bhnd,bhne->bhde", k.astype(np.float64), v.astype(np.float64)) * (scale or 1.0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_ksplit_applies_only_to_long_chunked_reductions():
    """The partial-sum kernel (``*_rf``: parallel over chunks, vectorized, unrolled rows) exists exactly where
    K >= KSPLIT_MIN_K and the chunk divides K."""
    assert KSPLIT_MIN_K % KSPLIT_CHUNK == 0
    (text,) = _rf_kernels(_kv_model(2, KSPLIT_MIN_K * 2, 64, 64))
    assert "T.parallel(" in text and "T.vectorized(" in text and "T.unroll(" in text
    assert f"T.int64({KSPLIT_MIN_K * 2 // KSPLIT_CHUNK})" in text  # one partial sum per chunk
    assert len(_rf_kernels(_kv_model(3, KSPLIT_MIN_K + KSPLIT_CHUNK, 32, 48, 0.125))) == 1  # with an epilogue
    assert _rf_kernels(_kv_model(2, KSPLIT_MIN_K + 2, 64, 64)) == []
    assert _rf_kernels(_kv_model(2, KSPLIT_MIN_K - KSPLIT_CHUNK, 64, 64)) == []


def _reduce_model(shape, axes, keepdims=0, elu=False):
    """ReduceSum over ``axes`` (optionally of elu(x) + 1, a producer the schedule inlines)."""
    from onnx import numpy_helper as nh
    nodes, src = [], "x"
    if elu:
        nodes += [helper.make_node("Elu", ["x"], ["e"]), helper.make_node("Add", ["e", "one"], ["p"])]
        src = "p"
    nodes.append(helper.make_node("ReduceSum", [src, "axes"], ["y"], keepdims=keepdims))
    out = [1 if i in [a % len(shape) for a in axes] else d for i, d in enumerate(shape)] if keepdims else \
        [d for i, d in enumerate(shape) if i not in [a % len(shape) for a in axes]]
    g = helper.make_graph(nodes, "rs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)],
                          [nh.from_array(np.array(axes, np.int64), "axes"), nh.from_array(np.array(1, np.float32), "one")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("target", exec_targets())
@pytest.mark.parametrize("shape,axes,keepdims,elu", [((2, 3, 1000, 64), [2], 0, False),  # k.sum(-2): strided rule
                                                     ((2, 3, 1000, 64), [-2], 1, True),  # with a producer, keepdims
                                                     ((3, 500, 48), [1], 0, False),
                                                     ((4, 300, 20), [1], 0, False),       # 20 columns: other rules
                                                     ((4, 16, 300), [-1], 0, False)])     # innermost: other rules
def test_reductions_match_numpy(target, shape, axes, keepdims, elu, rng):
    x = rng.standard_normal(shape).astype(np.float32)
    out = tvm_callable(_reduce_model(shape, axes, keepdims, elu), target, {"x": x})()
    got = (out if hasattr(out, "numpy") else out[0]).numpy()
    x64 = x.astype(np.float64)
    src = np.where(x64 > 0, x64, np.expm1(x64)) + 1 if elu else x64
    want = src.sum(axis=tuple(axes), keepdims=bool(keepdims))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_non_innermost_reduction_is_vectorized_across_the_kept_axis():
    """k.sum(-2): the reduction loop runs outside a vectorized loop over the kept last axis, accumulators local,
    parallel over the other kept axes."""
    mod = scheduled_module(import_onnx(_reduce_model((2, 8, 4096, 64), [2])).mod, get_target("avx2"))
    (text,) = [f.script() for gv, f in mod.functions_items() if "sum" in gv.name_hint]
    assert "T.parallel(" in text and "T.vectorized(T.int64(8))" in text and '"local"' in text
    # the reduction loop (4096) encloses the vectorized update
    assert 'sblock("x_red_update")' in text
    update = text[text.index("T.int64(4096)"):]
    assert "T.vectorized(" in update.split('sblock("x_red_update")')[0]

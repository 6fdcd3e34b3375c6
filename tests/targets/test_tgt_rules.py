"""CPU schedule rules on shapes the zoo does not pin down: transposes (tiled or fused) and the matmul that follows a
transpose, each against numpy, and the scheduled loops are parallel and vectorized."""

import re

import numpy as np
import pytest
from onnx import TensorProto, helper

from targets.bench import tvm_callable
from targets.importer import import_onnx
from targets.pipeline import loop_report, scheduled_module
from targets.table import get_target

from tgt_models import exec_targets


def _transpose_model(shape, perm):
    out = [shape[p] for p in perm]
    g = helper.make_graph([helper.make_node("Transpose", ["x"], ["t"], perm=perm),
                           helper.make_node("Relu", ["t"], ["y"])], "tr",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("target", exec_targets())
@pytest.mark.parametrize("shape,perm", [((3, 48, 80), (0, 2, 1)),      # tiled (multiples of 16)
                                        ((2, 4, 64, 32), (0, 1, 3, 2)),
                                        ((3, 50, 70), (0, 2, 1)),      # not a multiple of 16: fused fallback
                                        ((2, 32, 4, 16), (0, 2, 1, 3))])  # last axis kept: plain injective
def test_transposes_match_numpy(target, shape, perm, rng):
    model = _transpose_model(shape, perm)
    x = rng.standard_normal(shape).astype(np.float32)
    out = tvm_callable(model, target, {"x": x})()
    got = (out if hasattr(out, "numpy") else out[0]).numpy()
    np.testing.assert_array_equal(got, np.maximum(np.transpose(x, perm), 0))


def test_large_transpose_is_tiled_and_parallel():
    mod = scheduled_module(import_onnx(_transpose_model((8, 1024, 64), (0, 2, 1))).mod, get_target("avx512"))
    report = loop_report(mod)
    assert report and all(r["parallel"] and r["vectorized"] for r in report.values())
    text = "\n".join(f.script() for _, f in mod.functions_items())
    assert re.search(r"T\.unroll\((T\.int64\()?16\b", text)  # the 16-row tile of the transpose schedule


def test_transposed_matmul_operand_matches_numpy(rng):
    """φ(K)ᵀ V (the linear-attention state): the transpose of the first operand stays a separate tiled kernel, the
    second-operand transpose is fused into the matmul (FuseTransposeMatmul)."""
    a = rng.standard_normal((2, 256, 64)).astype(np.float32)
    b = rng.standard_normal((2, 256, 32)).astype(np.float32)
    c = rng.standard_normal((2, 48, 64)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Transpose", ["a"], ["at"], perm=[0, 2, 1]),
                           helper.make_node("MatMul", ["at", "b"], ["s"]),
                           helper.make_node("Transpose", ["a"], ["at2"], perm=[0, 2, 1]),
                           helper.make_node("MatMul", ["c", "at2"], ["y"])], "tm",
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(v.shape))
                           for n, v in (("a", a), ("b", b), ("c", c))],
                          [helper.make_tensor_value_info("s", TensorProto.FLOAT, [2, 64, 32]),
                           helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 48, 256])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    s, y = tvm_callable(model, "host", {"a": a, "b": b, "c": c})()
    np.testing.assert_allclose(s.numpy(), np.transpose(a, (0, 2, 1)) @ b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y.numpy(), c @ np.transpose(a, (0, 2, 1)), rtol=1e-4, atol=1e-4)


def test_soft_variant_lowers_and_matches_onnxruntime(rng):
    """SOFT (Newton-Schulz pseudo-inverse, tuple-typed values in the Relax graph) compiles and matches onnxruntime:
    the transpose/matmul fusion pass must not trip over it."""
    import torch

    from passes.attention import VARIANTS
    from rewrite.io import quiet_stdout
    from tgt_models import ort_run

    class Soft(torch.nn.Module):
        def forward(self, q, k, v):
            return VARIANTS["soft"].fn(q, k, v, scale=q.shape[-1] ** -0.5, causal=False, key_padding=None)

    q, k, v = (torch.from_numpy(rng.standard_normal((1, 2, 128, 32)).astype(np.float32)) for _ in range(3))
    with quiet_stdout():
        model = torch.onnx.export(Soft(), (q, k, v), dynamo=True, input_names=["q", "k", "v"]).model_proto
    feeds = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()}
    out = tvm_callable(model, "host", feeds)()
    got = (out if hasattr(out, "numpy") else out[0]).numpy()
    np.testing.assert_allclose(got, ort_run(model, feeds)[0], rtol=1e-4, atol=1e-4)


def test_softmax_routing_leaves_int32_overflowing_tensors_to_tvm():
    """The hand kernels index with int32: a (8, 16384, 16384) softmax (2^31 elements, attention at N = 16384) keeps
    TVM's own softmax, a small one is routed to the hand kernel."""
    from tvm import relax

    from targets.pipeline import RouteSoftmax

    bb = relax.BlockBuilder()
    big = relax.Var("big", relax.TensorType((8, 16384, 16384), "float32"))
    small = relax.Var("small", relax.TensorType((4, 128), "float32"))
    with bb.function("main", [big, small]):
        a = bb.emit(relax.op.nn.softmax(big, axis=-1))
        b = bb.emit(relax.op.nn.softmax(small, axis=-1))
        bb.emit_func_output(relax.Tuple([a, b]))
    mod = RouteSoftmax(get_target("avx512"))(bb.get())
    text = mod.script()
    assert text.count("R.nn.softmax") == 1 and "softmax_three_pass_fused_4x128" in text


def _matmul_bias_model(a_shape, b_shape, bias_len):
    out = list(a_shape[:-1]) + [b_shape[-1]]
    g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["m"]),
                           helper.make_node("Add", ["m", "bias"], ["y"])], "mm",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, list(a_shape)),
                           helper.make_tensor_value_info("b", TensorProto.FLOAT, list(b_shape)),
                           helper.make_tensor_value_info("bias", TensorProto.FLOAT, [bias_len])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("target", exec_targets())
@pytest.mark.parametrize("a_shape,b_shape", [((3, 197, 64), (3, 64, 197)),   # ViT-Base q·kᵀ: 197 is prime
                                             ((2, 101, 40), (2, 40, 100)),   # rows and columns both padded
                                             ((50, 72), (72, 37))])          # too much padding: divisor tile
def test_matmuls_without_a_dividing_tile_match_numpy(target, a_shape, b_shape, rng):
    """Row / column extents no register tile divides are computed on zero-padded operands (MatmulRule pads, then
    crops): the numbers must be the plain product, bias epilogue included."""
    a = rng.standard_normal(a_shape).astype(np.float32)
    b = rng.standard_normal(b_shape).astype(np.float32)
    bias = rng.standard_normal(b_shape[-1]).astype(np.float32)
    out = tvm_callable(_matmul_bias_model(a_shape, b_shape, b_shape[-1]), target, {"a": a, "b": b, "bias": bias})()
    got = (out if hasattr(out, "numpy") else out[0]).numpy()
    np.testing.assert_allclose(got, a.astype(np.float64) @ b + bias, rtol=1e-4, atol=1e-4)


def test_prime_width_matmul_is_padded_parallel_and_vectorized():
    from targets.cpu_rules import _padded_extents
    assert _padded_extents(197, 197, 16) == (200, 208) and _padded_extents(192, 192, 16) == (192, 192)
    mod = scheduled_module(import_onnx(_matmul_bias_model((3, 197, 64), (3, 64, 197), 197)).mod,
                           get_target("avx512"))
    text = "\n".join(f.script() for _, f in mod.functions_items())
    assert "208" in text and "200" in text  # the padded extents
    report = loop_report(mod)
    assert any(r["parallel"] and r["vectorized"] for r in report.values())


def _symbolic_linear_model(n_in: int, n_out: int, rng):
    """MatMul by a constant (n_in, n_out) weight, bias and Relu, on an input (batch, seq, n_in) with both leading
    dims symbolic."""
    from onnx import numpy_helper
    w = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
    bias = rng.standard_normal(n_out).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "bias"], ["a"]),
                           helper.make_node("Relu", ["a"], ["y"])], "lin",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", n_in])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", n_out])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "bias")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), w, bias


@pytest.mark.parametrize("target", exec_targets())
def test_symbolic_rows_matmul_serves_every_shape(target, rng, tmp_path):
    """One build with symbolic batch and length: the matmul gets MatmulRule's tiled schedule with a guarded row tail
    (rows not a multiple of the tile, a single row), numbers equal to numpy at each shape."""
    from targets import Runner, compile_model
    model, w, bias = _symbolic_linear_model(96, 80, rng)
    path = tmp_path / "lin.onnx"
    path.write_bytes(model.SerializeToString())
    compile_model(str(path), target, tmp_path / "lin.so", shapes=None)
    runner = Runner(tmp_path / "lin.so")
    for shape in ((2, 16, 96), (1, 7, 96), (3, 1, 96)):
        x = rng.standard_normal(shape).astype(np.float32)
        got = list(runner.run({"x": x}).values())[0]
        np.testing.assert_allclose(got, np.maximum(x.astype(np.float64) @ w + bias, 0), rtol=1e-4, atol=1e-4)


def test_symbolic_rows_matmul_is_tiled_parallel_and_vectorized(rng):
    model, _, _ = _symbolic_linear_model(96, 80, rng)
    mod = scheduled_module(import_onnx(model).mod, get_target("avx512"))
    matmuls = {name: f.script() for name, f in ((gv.name_hint, f) for gv, f in mod.functions_items())
               if "matmul" in name}
    assert matmuls, "no matmul kernel in the scheduled module"
    for name, text in matmuls.items():
        assert "T.parallel(" in text and "T.vectorized(" in text, name
        assert re.search(r"T\.unroll\((T\.int64\()?4\b", text), name  # the 4-row register tile, guarded


def _symbolic_scores_model(h: int = 2, d: int = 16):
    """q·kᵀ with a symbolic length n: the matmul's column extent is symbolic."""
    g = helper.make_graph([helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
                           helper.make_node("MatMul", ["q", "kt"], ["y"])], "qk",
                          [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, h, "n", d]),
                           helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, h, "n", d])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, h, "n", "n"])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("target", exec_targets())
def test_symbolic_column_matmul_serves_every_length(target, rng, tmp_path):
    """q·kᵀ built once with a symbolic length: the column extent is padded to the vector tile inside the kernel;
    lengths that are not a multiple of it (1, 33, 70) equal numpy."""
    from targets import Runner, compile_model
    compile_model(_symbolic_scores_model(), target, tmp_path / "qk.so", shapes=None)
    runner = Runner(tmp_path / "qk.so")
    for n in (1, 33, 70, 64):
        q = rng.standard_normal((1, 2, n, 16)).astype(np.float32)
        k = rng.standard_normal((1, 2, n, 16)).astype(np.float32)
        got = runner.run({"q": q, "k": k})["y"]
        np.testing.assert_allclose(got, q.astype(np.float64) @ k.astype(np.float64).transpose(0, 1, 3, 2),
                                   rtol=1e-4, atol=1e-4)


def test_symbolic_column_matmul_is_padded_tiled_and_vectorized():
    mod = scheduled_module(import_onnx(_symbolic_scores_model()).mod, get_target("avx2"))
    (text,) = [f.script() for gv, f in mod.functions_items() if "matmul" in gv.name_hint]
    assert "T.parallel(" in text and "T.vectorized(T.int64(16))" in text  # 2 AVX2 vectors per column tile
    assert "// T.int64(16) * T.int64(16)" in text  # the column extent padded to a multiple of the tile


def _symbolic_gelu_linear_model(n_in: int, n_out: int, rng):
    """MatMul by a constant (n_in, n_out) weight, bias and the erf GELU (the BERT FFN's first half), on an input
    (batch, seq, n_in) with both leading dims symbolic."""
    from onnx import numpy_helper
    w = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
    bias = rng.standard_normal(n_out).astype(np.float32)
    consts = {"w": w, "bias": bias, "sqrt2": np.float32(np.sqrt(2.0)), "one": np.float32(1.0),
              "half": np.float32(0.5)}
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "bias"], ["a"]),
                           helper.make_node("Div", ["a", "sqrt2"], ["s"]), helper.make_node("Erf", ["s"], ["e"]),
                           helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["a", "e1"], ["p"]),
                           helper.make_node("Mul", ["p", "half"], ["y"])], "ffn",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", n_in])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", n_out])],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("target", exec_targets())
@pytest.mark.parametrize("n_in,n_out", [(160, 96), (256, 40)])
def test_symbolic_packed_matmul_with_gelu_matches_onnxruntime(target, n_in, n_out, rng, tmp_path):
    """One build with symbolic batch and length of a K >= PACK_MIN_K matmul + bias + erf GELU (the packed
    column-panel schedule with its accumulator tile on the stack): row counts that are not a multiple of the
    4-row tile (1, 7, 13) and a width that is not a multiple of two vectors (40) equal onnxruntime within 1e-4."""
    import onnxruntime as ort

    from targets import Runner, compile_model
    path = tmp_path / "ffn.onnx"
    path.write_bytes(_symbolic_gelu_linear_model(n_in, n_out, rng).SerializeToString())
    compile_model(str(path), target, tmp_path / "ffn.so", shapes=None)
    runner = Runner(tmp_path / "ffn.so")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in ((1, 1), (2, 7), (3, 13), (1, 64)):
        x = rng.standard_normal(shape + (n_in,)).astype(np.float32)
        got = runner.run({"x": x})["y"]
        want = sess.run(None, {"x": x})[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_symbolic_packed_matmul_schedule_and_static_unchanged(rng):
    """The symbolic build packs the weight into column panels (a ``param_0_global`` copy inside the parallel loop)
    and keeps the register tile out of ``local`` scope (which TVM lowers to a heap workspace on CPUs); the static
    build of the same layer keeps its ``local`` accumulator tile."""
    model = _symbolic_gelu_linear_model(160, 96, rng)
    mod = scheduled_module(import_onnx(model).mod, get_target("avx512"))
    (text,) = [f.script() for gv, f in mod.functions_items() if "matmul" in gv.name_hint]
    assert "param_0_global" in text and "T.parallel(" in text and "T.vectorized(" in text
    assert 'scope="local"' not in text
    smod = scheduled_module(import_onnx(model, shapes={"x": [2, 64, 160]}).mod, get_target("avx512"))
    (stext,) = [f.script() for gv, f in smod.functions_items() if "matmul" in gv.name_hint]
    assert 'scope="local"' in stext

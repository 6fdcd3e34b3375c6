"""Artefacts: export, metadata, reload in a fresh process, typed errors, atomic output."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from targets import Runner, compile_model
from targets.errors import CompileError, InputError, ModelLoadError, TargetError

from tgt_models import ms_attention_model, ort_run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def artefact(tmp_path_factory):
    d = tmp_path_factory.mktemp("art")
    proto = ms_attention_model()
    path = d / "attn.so"
    meta = compile_model(proto, "avx512", path)
    return proto, path, meta


def _feeds():
    rng = np.random.default_rng(3)
    m = np.ones((2, 16), np.int32)
    m[:, -2:] = 0
    return {"x": rng.standard_normal((2, 16, 32)).astype(np.float32), "mask": m}


def test_metadata_sidecar(artefact):
    _, path, meta = artefact
    assert path.exists()
    side = json.loads((path.parent / (path.name + ".json")).read_text())
    assert side["inputs"] == [{"name": "x", "shape": [2, 16, 32], "dtype": "float32"},
                              {"name": "mask", "shape": [2, 16], "dtype": "int32"}]
    assert [o["name"] for o in side["outputs"]] == ["y"]
    assert side["target"] == meta["target"] and "llvm" in side["target"]


def test_runner_matches_ort(artefact):
    proto, path, _ = artefact
    out = Runner(path).run(_feeds())
    np.testing.assert_allclose(out["y"], ort_run(proto, _feeds())[0], atol=1e-4)


def test_reload_in_fresh_process(artefact, tmp_path):
    proto, path, _ = artefact
    feeds = _feeds()
    np.savez(tmp_path / "in.npz", **feeds)
    code = (f"import sys, numpy as np; sys.path.insert(0, {ROOT!r}); from targets import Runner; "
            f"d = dict(np.load({str(tmp_path / 'in.npz')!r})); out = Runner({str(path)!r}).run(d); "
            f"np.save({str(tmp_path / 'out.npy')!r}, out['y'])")
    env = dict(os.environ, TVM_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), Runner(path).run(feeds)["y"], rtol=0, atol=0)


def test_runner_input_errors(artefact):
    _, path, _ = artefact
    r = Runner(path)
    feeds = _feeds()
    with pytest.raises(InputError) as ei:
        r.run({"x": feeds["x"]})
    assert ei.value.culprit == "mask"
    with pytest.raises(InputError) as ei:
        r.run({"x": feeds["x"][:1], "mask": feeds["mask"]})
    assert ei.value.culprit == "x"
    with pytest.raises(InputError):
        r.run({"x": feeds["x"].astype(np.float64), "mask": feeds["mask"]})


def test_bad_model_leaves_nothing(tmp_path):
    out = tmp_path / "bad.so"
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(ModelLoadError) as ei:
        compile_model(bad, "avx2", out)
    assert ei.value.culprit == str(bad)
    with pytest.raises(TargetError):
        compile_model(tmp_path / "missing.onnx", "avx2", out)
    with pytest.raises(TargetError):
        compile_model(ms_attention_model(), "no-such-target", out)
    assert os.listdir(tmp_path) == ["bad.onnx"]


def test_export_failure_is_atomic(tmp_path):
    with pytest.raises(CompileError):
        compile_model(ms_attention_model(), "avx2", tmp_path / "no_dir" / "m.so")
    assert not (tmp_path / "no_dir").exists()


def _dynamic_model():
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(5).standard_normal((16, 16)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["s"]), helper.make_node("Softmax", ["s"], ["y"], axis=-1)]
    g = helper.make_graph(nodes, "dyn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 16])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("shapes", [None, {"x": [3, 5, 16]}], ids=["symbolic", "user_shapes"])
def test_dynamic_dims(tmp_path, shapes):
    proto = _dynamic_model()
    meta = compile_model(proto, "avx2", tmp_path / "dyn.so", shapes=shapes)
    assert meta["inputs"][0]["shape"] == (["batch", "seq", 16] if shapes is None else [3, 5, 16])
    x = np.random.default_rng(6).standard_normal((3, 5, 16)).astype(np.float32)
    out = Runner(tmp_path / "dyn.so").run({"x": x})["y"]
    np.testing.assert_allclose(out, ort_run(proto, {"x": x})[0], atol=1e-5)
    if shapes:
        with pytest.raises(InputError):
            Runner(tmp_path / "dyn.so").run({"x": x[:2]})

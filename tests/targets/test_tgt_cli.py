"""`softswap compile` / `run`: a library and its metadata are written, run on an .npz, and match onnxruntime;
bad input exits with 2 and writes nothing."""
from __future__ import annotations

import numpy as np
import onnx

from rewrite.cli import main
from tgt_models import ort_run, softmax_matmul_model


def test_compile_run_roundtrip(tmp_path, rng):
    model = softmax_matmul_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    lib = tmp_path / "m.so"
    assert main(["compile", str(path), "--target", "avx2", "-o", str(lib)]) == 0
    assert lib.exists() and (tmp_path / "m.so.json").exists()
    feeds = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
             for i in model.graph.input}
    np.savez(tmp_path / "x.npz", **feeds)
    assert main(["run", str(lib), "--inputs", str(tmp_path / "x.npz"), "-o", str(tmp_path / "y.npz")]) == 0
    with np.load(tmp_path / "y.npz") as got:
        (name,) = got.files
        np.testing.assert_allclose(got[name], ort_run(model, feeds)[0], rtol=1e-4, atol=1e-5)


def test_bad_inputs_exit_2(tmp_path, capsys):
    assert main(["compile", str(tmp_path / "missing.onnx"), "--target", "avx2", "-o", str(tmp_path / "m.so")]) == 2
    assert "missing.onnx" in capsys.readouterr().err
    assert not (tmp_path / "m.so").exists()
    path = tmp_path / "m.onnx"
    onnx.save(softmax_matmul_model(), path)
    assert main(["compile", str(path), "--target", "nosuchcpu", "-o", str(tmp_path / "m.so")]) == 2
    assert "nosuchcpu" in capsys.readouterr().err
    assert not (tmp_path / "m.so").exists()

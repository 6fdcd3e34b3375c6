"""Engine contracts that used to be silent: a fused op without a known scale is refused with a reason (not a NaN
scale), the pass manager checks requires/ensures, sigmoid's n_ref comes from the model's config."""
from __future__ import annotations

import onnx
import pytest
import torch
from onnx import TensorProto, helper

import rewrite
from rewrite.errors import OptionError
from rewrite.io import LoadedModel, load_onnx
from rewrite.passes import Pass, PassManager, PassResult, get_pass


def test_fused_op_without_scale_or_hidden_size_is_refused(tmp_path):
    q = helper.make_tensor_value_info("q", TensorProto.FLOAT, [2, 8, "hidden"])
    node = helper.make_node("MultiHeadAttention", ["q", "q", "q"], ["y"], domain="com.microsoft", num_heads=4)
    graph = helper.make_graph([node], "g", [q], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    onnx.save(model, tmp_path / "mha.onnx")
    report = rewrite.inspect(load_onnx(tmp_path / "mha.onnx"))
    assert not report.attention_sites
    (_, reason), = report.unmatched
    assert "static hidden size" in reason.expected and "hidden" in reason.found


class _Needs(Pass):
    name = "needs"
    requires = ("attention:rewritten",)

    def run(self, model):
        return PassResult(model, False)


class _Gives(Pass):
    name = "gives"
    ensures = ("attention:rewritten", "graph:onnx")

    def run(self, model):
        return PassResult(model, False)


def test_pass_manager_checks_requires_and_ensures():
    fx_model = LoadedModel(kind="fx", source="m")
    with pytest.raises(OptionError, match="no earlier pass"):
        PassManager([_Needs()]).run(fx_model)
    with pytest.raises(RuntimeError, match="ensures a onnx graph"):
        PassManager([_Gives(), _Needs()]).run(fx_model)
    onnx_model = LoadedModel(kind="onnx", source="m")
    _, records = PassManager([_Gives(), _Needs()]).run(onnx_model)
    assert [r.name for r in records] == ["gives", "needs"]


def test_sigmoid_n_ref_from_the_model_config():
    p = get_pass("attention.sigmoid")
    assert p.variant_options["n_ref"] is None  # unset: taken from the model at conversion
    cfg = type("Cfg", (), {"max_position_embeddings": 512})()
    hf = type("HF", (), {"config": cfg})()
    assert p._options_for(LoadedModel(kind="fx", source="m", extra={"hf": hf}))["n_ref"] == 512
    assert p._options_for(LoadedModel(kind="fx", source="m"))["n_ref"] == 2048
    assert get_pass("attention.sigmoid", options={"n_ref": "64"})._options_for(
        LoadedModel(kind="fx", source="m", extra={"hf": hf}))["n_ref"] == 64


def test_ort_session_of_a_large_model_leaves_no_temporary_folder(tmp_path, monkeypatch):
    """Models above protobuf's 2 GB limit go to onnxruntime through a temporary folder; it is removed once the
    session has read the model (it leaked, once per session, before)."""
    import tempfile

    import numpy as np
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    import rewrite.io as io

    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    monkeypatch.setattr(io, "_initializer_bytes", lambda _m: 3 << 30)  # take the > 2 GB path
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    session = io.ort_session(model)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], x)
    assert list(tmp_path.iterdir()) == []

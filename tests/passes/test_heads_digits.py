"""Head replacements on a real task: the digits CNN (trained in-process), each head fitted on its frozen features.

References: scikit-learn's LinearSVC on the same features (margins and predictions), onnxruntime for the ONNX
graphs, the torch model's own accuracy on the digits test split (never seen by the heads), the Z-score formula in
numpy for the added outputs.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from rewrite.api import convert, export
from rewrite.fit_data import FitData

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from digits_models import digits_split, export_fx, export_onnx, trained_digits_cnn  # noqa: E402

QUIET = {"progress": False}
#: LinearSVC driven to its unique optimum, so fits on FX- and onnxruntime-captured features agree.
TIGHT = {"tol": 1e-8, "max_iter": 50000}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    model = trained_digits_cnn(softmax=True)
    split = digits_split()
    onnx_path = export_onnx(model, tmp_path_factory.mktemp("heads") / "digits.onnx")
    return model, split, onnx_path


def _fx_outputs(loaded, x):
    out = loaded.ep.module()(x=torch.from_numpy(x))
    return [o.detach().numpy() for o in (out if isinstance(out, (tuple, list)) else [out])]


def _ort_outputs(path_or_model, x):
    if not isinstance(path_or_model, (str, Path)):
        import onnx_ir as ir
        path_or_model = ir.to_proto(path_or_model.onnx).SerializeToString()
    sess = ort.InferenceSession(path_or_model, providers=["CPUExecutionProvider"])
    return [o.name for o in sess.get_outputs()], sess.run(None, {"x": x})


def _acc(scores, y):
    return float((np.asarray(scores).argmax(-1) == y).mean())


def test_held_out_accuracy_of_every_head(digits):
    model, split, _ = digits
    data = {"x": split.x_train, "y": split.y_train}
    with torch.no_grad():
        softmax_acc = _acc(model(torch.from_numpy(split.x_test)).numpy(), split.y_test)
    runs = {"svm posthoc": ("svm", {}), "svm finetune": ("svm", {"fit": "finetune", "preset": "agarap"}),
            "zloss": ("zloss", {}), "fourier": ("fourier", {"ordinal": True, "n_freq": 5})}
    acc = {}
    for label, (kind, opts) in runs.items():
        new, report = convert(export_fx(model), head=kind, fit=data, options={**opts, **QUIET})
        acc[label] = _acc(_fx_outputs(new, split.x_test)[0], split.y_test)
        row = report["passes"][0]["sites"][0]
        assert row["status"] == "replaced" and report["passes"][0]["lines"]
        # the report's held-out accuracy of the original head: the torch model on the same held-out split
        _, held = FitData({"x": split.x_train}, split.y_train).split(0.2, 0)
        with torch.no_grad():
            assert row["accuracy_original"] == pytest.approx(_acc(model(torch.from_numpy(held.inputs["x"])).numpy(),
                                                                  held.y))
    print("digits test accuracy:", {"softmax": softmax_acc, **acc})
    assert softmax_acc > 0.95
    assert acc["svm posthoc"] >= softmax_acc - 0.01  # within 1.0 point of softmax, or better (here it is often better)
    assert acc["svm finetune"] >= softmax_acc - 0.02
    assert acc["zloss"] >= softmax_acc - 0.02
    assert acc["fourier"] >= 0.85  # unordered digits through a smoothness prior: a cost, but a working head


def _features(model, x):
    with torch.no_grad():
        return model.features(torch.from_numpy(x)).double().numpy()


@pytest.mark.parametrize("standardize", [False, True])
def test_svm_margins_and_predictions_equal_linearsvc(digits, standardize):
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC
    model, split, _ = digits
    new, report = convert(export_fx(model), head="svm", fit={"x": split.x_train, "y": split.y_train},
                          options={"standardize": standardize, **TIGHT, **QUIET})
    fit_part, _ = FitData({"x": split.x_train}, split.y_train).split(0.2, 0)
    ref = LinearSVC(tol=1e-8, max_iter=50000)
    ref = make_pipeline(StandardScaler(), ref) if standardize else ref
    ref.fit(_features(model, fit_part.inputs["x"]), fit_part.y)
    margins = _fx_outputs(new, split.x_test)[0]
    test_features = _features(model, split.x_test)
    np.testing.assert_allclose(margins, ref.decision_function(test_features), atol=1e-5)
    assert (margins.argmax(-1) == ref.predict(test_features)).all()
    info = report["passes"][0]["sites"][0]["fit"]
    assert info["converged"] and info["standardized"] == standardize and info["solver"] == "LinearSVC"
    assert report["passes"][0]["sites"][0]["removed_activation"] == "softmax"


@pytest.mark.parametrize("kind, opts", [("svm", {**TIGHT, "decision_output": True}), ("zloss", {"extra_outputs": True, "steps": 200}),
                                        ("fourier", {"class_order": "0,1,2,3,4,5,6,7,8,9", "steps": 200})])
def test_fx_and_onnx_agree_and_run_in_onnxruntime(digits, tmp_path, kind, opts):
    model, split, onnx_path = digits
    data = {"x": split.x_train, "y": split.y_train}
    fx_new, fx_report = convert(export_fx(model), head=kind, fit=data, options={**opts, **QUIET})
    out = tmp_path / f"{kind}.onnx"
    onnx_new, onnx_report = convert(onnx_path, out, head=kind, fit=data, options={**opts, **QUIET})
    names, ort_out = _ort_outputs(out, split.x_test)
    fx_out = _fx_outputs(fx_new, split.x_test)
    assert names == onnx_new.output_names == fx_new.output_names
    for a, b in zip(ort_out, fx_out):
        np.testing.assert_allclose(a, b, atol=1e-4)
    # the FX result exported to ONNX runs in onnxruntime and agrees with the FX program
    exported = export(fx_new, tmp_path / f"{kind}_from_fx.onnx")
    _, from_fx = _ort_outputs(exported, split.x_test)
    for a, b in zip(from_fx, fx_out):
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert onnx_report["passes"][0]["added_outputs"] == fx_report["passes"][0]["added_outputs"]
    if kind == "zloss":
        assert names == ["logits", "z", "confidence"]
        logits, z, conf = ort_out
        ref_z = (logits - logits.mean(-1, keepdims=True)) / (logits.std(-1, keepdims=True) + 1e-12)
        np.testing.assert_allclose(z, ref_z, atol=1e-4)
        np.testing.assert_allclose(conf, 1 / (1 + np.exp(-z)), atol=1e-5)
        assert (z.argmax(-1) == logits.argmax(-1)).all()
    if kind == "svm":  # the softmax is gone from the graph; the decision output is argmax of the margins
        import onnx
        ops = {n.op_type for n in onnx.load(out).graph.node}
        assert "Softmax" not in ops and "ArgMax" in ops and names == ["logits", "decision"]
        assert ort_out[1].dtype == np.int64 and (ort_out[1] == ort_out[0].argmax(-1)).all()
    if kind == "fourier":  # the original softmax kept after the Fourier logits: rows are distributions
        np.testing.assert_allclose(ort_out[0].sum(-1), 1.0, atol=1e-5)


def test_fourier_refuses_unordered_classes_and_bad_orders(digits):
    from passes.heads.errors import ClassOrderError
    model, split, _ = digits
    data = {"x": split.x_train, "y": split.y_train}
    with pytest.raises(ClassOrderError, match="class_order=.*ordinal=true"):
        convert(export_fx(model), head="fourier", fit=data, options=QUIET)
    with pytest.raises(ClassOrderError, match="not a permutation"):
        convert(export_fx(model), head="fourier", fit=data, options={"class_order": "0,1,2", **QUIET})


def test_head_option_selects_and_names_unknown_heads(digits):
    from rewrite.errors import OptionError
    model, split, _ = digits
    with pytest.raises(OptionError, match="head='head3'.*head0"):
        convert(export_fx(model), head="svm", fit={"x": split.x_train, "y": split.y_train},
                options={"head": "head3", **QUIET})
    with pytest.raises(OptionError, match="no option 'colour'"):
        convert(export_fx(model), head="svm", fit={"x": split.x_train, "y": split.y_train}, options={"colour": 1})


def test_svm_head_on_a_legacy_onnx_gemm_graph(tmp_path):
    """TorchScript-exported ONNX (opset 17, the head a ``Gemm``): upgraded, the head replaced, margins equal to
    LinearSVC on the torch model's features."""
    import onnx
    from sklearn.svm import LinearSVC
    model, split = trained_digits_cnn(), digits_split()
    src = tmp_path / "legacy.onnx"
    torch.onnx.export(model, (torch.from_numpy(split.x_test[:2]),), src, dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "b"}, "logits": {0: "b"}})
    assert "Gemm" in {n.op_type for n in onnx.load(src).graph.node}
    out = tmp_path / "legacy_svm.onnx"
    convert(src, out, head="svm", fit={"x": split.x_train, "y": split.y_train}, options={**TIGHT, **QUIET})
    names, (margins,) = _ort_outputs(out, split.x_test)
    fit_part, _ = FitData({"x": split.x_train}, split.y_train).split(0.2, 0)
    ref = LinearSVC(tol=1e-8, max_iter=50000).fit(_features(model, fit_part.inputs["x"]), fit_part.y)
    assert names == ["logits"]
    np.testing.assert_allclose(margins, ref.decision_function(_features(model, split.x_test)), atol=1e-4)

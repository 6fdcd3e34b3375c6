"""Pass ``ood.mahalanobis`` on the real task: the digits CNN (tests/digits_models.py), in-distribution = the digits
test split, OOD = scikit-image faces (lfw_subset) and photographs cut to 8×8 patches (tests/ood_data.py; half of them
given to the pass as ``x_ood`` to fit the layer weights, the other half only scored here).

Checked: the original outputs are bit-identical, the in-graph ``ood_score`` equals the detector's float64 numpy
score, FX and ONNX scores agree (1e-4), the ONNX model runs in onnxruntime, the Mahalanobis ensemble beats the
maximum-softmax baseline in AUROC and TNR at 95% TPR, the input pre-processing variant, ``--layers``, the CLI and
its one-line refusals (exit 2, nothing written)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from passes.ood import preprocess
from passes.ood.mahalanobis_pass import MahalanobisPass
from passes.ood.metrics import format_metrics, ood_metrics
from rewrite import io as mio
from rewrite.api import convert, export, graph_view
from rewrite.capture import capture_values
from rewrite.cli import main
from rewrite.errors import OptionError
from rewrite.fit_data import FitDataError, load_fit_data
from rewrite.verify import run

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from digits_models import digits_split, export_fx, export_onnx, trained_digits_cnn  # noqa: E402
from ood_data import ood_inputs  # noqa: E402


@pytest.fixture(scope="module")
def task():
    split = digits_split()
    ood = ood_inputs()
    perm = np.random.default_rng(0).permutation(len(ood))
    ood_fit, ood_test = ood[perm[: len(ood) // 2]], ood[perm[len(ood) // 2:]]
    fit = {"x": split.x_train, "y": split.y_train, "x_ood": ood_fit}
    return split, fit, ood_test


@pytest.fixture(scope="module")
def fx_result(task):
    _, fit, _ = task
    model = trained_digits_cnn()
    loaded = export_fx(model)
    p = MahalanobisPass(fit=load_fit_data(fit, loaded.input_names))
    return model, loaded, p.run(loaded), p


@pytest.fixture(scope="module")
def onnx_result(task, tmp_path_factory):
    _, fit, _ = task
    path = export_onnx(trained_digits_cnn(), tmp_path_factory.mktemp("ood") / "digits.onnx")
    new, report = convert(path, ood="mahalanobis", fit=fit)
    return mio.load_model(path), new, report


def _inputs(task):
    split, _, ood_test = task
    return np.concatenate([split.x_test, ood_test]), len(split.x_test)


@pytest.mark.parametrize("kind", ["fx", "onnx"])
def test_original_outputs_are_bit_identical(task, fx_result, onnx_result, kind):
    original, new = (fx_result[1], fx_result[2].model) if kind == "fx" else onnx_result[:2]
    x, _ = _inputs(task)
    before, after = run(original, {"x": x}), run(new, {"x": x})
    assert list(after) == ["logits", "ood_score"] and new.output_names == ["logits", "ood_score"]
    assert np.array_equal(before["logits"], after["logits"])
    assert after["ood_score"].shape == (len(x),) and after["ood_score"].dtype == np.float32
    if kind == "onnx":
        assert onnx_result[2]["fidelity"]["added_outputs"] == ["ood_score"]


def test_in_graph_score_equals_the_float64_detector(task, fx_result):
    _, loaded, result, p = fx_result
    x, _ = _inputs(task)
    g, _ = graph_view(loaded)
    by_name = {n.name: n for n in g.gm.graph.nodes}
    feats = capture_values(loaded, g, [by_name[t] for t in p.detector.taps], {"x": x})
    expect = p.detector.ood_score(feats)
    got = run(result.model, {"x": x})["ood_score"]
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-4)


def test_fx_and_onnx_scores_agree_and_the_onnx_model_runs_in_onnxruntime(task, fx_result, onnx_result, tmp_path):
    x, _ = _inputs(task)
    fx_scores = run(fx_result[2].model, {"x": x})["ood_score"]
    # the rewritten FX program exported to ONNX, run by onnxruntime itself
    path = export(fx_result[2].model, tmp_path / "fx_rewritten.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "ood_score"]
    logits, scores = session.run(None, {"x": x})
    np.testing.assert_allclose(scores, fx_scores, rtol=1e-6, atol=1e-4)  # the same detector: 1e-4 absolute
    # the pass run on the ONNX graph (features captured in onnxruntime, fitted independently) agrees to 1e-4
    # relative: OOD scores reach the hundreds and the two fits see features differing in the last float32 bits
    path2 = export(onnx_result[1], tmp_path / "onnx_rewritten.onnx")
    session2 = ort.InferenceSession(str(path2), providers=["CPUExecutionProvider"])
    logits2, scores2 = session2.run(None, {"x": x})
    np.testing.assert_allclose(scores2, fx_scores, rtol=1e-4, atol=1e-4)
    # bit-identical logits under onnxruntime's default graph optimizations too (same level on both sides)
    original = ort.InferenceSession(onnx_result[0].source, providers=["CPUExecutionProvider"])
    assert np.array_equal(logits2, original.run(None, {"x": x})[0])


def _max_softmax_score(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return -1.0 / np.exp(z).sum(axis=1)  # −max softmax: higher = more likely OOD


def test_mahalanobis_beats_the_max_softmax_baseline(task, fx_result):
    x, n_in = _inputs(task)
    out = run(fx_result[2].model, {"x": x})
    maha = ood_metrics(out["ood_score"][:n_in], out["ood_score"][n_in:])
    base_scores = _max_softmax_score(out["logits"].astype(np.float64))
    base = ood_metrics(base_scores[:n_in], base_scores[n_in:])
    print(f"\nMahalanobis ensemble: {format_metrics(maha)}\nmax-softmax baseline: {format_metrics(base)}")
    assert maha["auroc"] > base["auroc"] + 0.05 and maha["auroc"] >= 0.95
    assert maha["tnr_at_tpr95"] > base["tnr_at_tpr95"] + 0.1
    # the classifier itself is the trained one: its accuracy is untouched
    split = task[0]
    assert (out["logits"][:n_in].argmax(1) == split.y_test).mean() > 0.9


def test_report_states_the_sign_taps_weights_and_metrics(fx_result):
    report = fx_result[2].report
    assert report["pass"] == "ood.mahalanobis" and report["replaced"] == 3 and report["found"] == 3
    assert report["sign"] == "higher = more likely out-of-distribution" and report["ensemble"] == "logistic"
    assert [s["status"] for s in report["sites"]] == ["replaced"] * 3
    assert all(isinstance(s["weight"], float) for s in report["sites"])
    assert set(report["metrics"]) == {"mahalanobis", "max-softmax", "layer tap0", "layer tap1", "layer tap2"}
    text = "\n".join(report["lines"])
    assert "higher = more likely out-of-distribution" in text and "TNR@TPR95" in text and "max-softmax" in text


def test_without_ood_data_the_layers_get_equal_z_scored_weights(task):
    split, fit, ood_test = task
    loaded = export_fx(trained_digits_cnn())
    data = load_fit_data({"x": fit["x"], "y": fit["y"]}, ["x"])
    p = MahalanobisPass(fit=data)
    result = p.run(loaded)
    assert result.report["ensemble"] == "equal" and result.report["metrics"] == {}
    np.testing.assert_allclose(p.detector.weights.beta, 1 / 3)
    x = np.concatenate([split.x_test, ood_test])
    s = run(result.model, {"x": x})["ood_score"]
    assert ood_metrics(s[: len(split.x_test)], s[len(split.x_test):])["auroc"] > 0.9


def test_layers_select_taps(task):
    _, fit, _ = task
    loaded = export_fx(trained_digits_cnn())
    data = load_fit_data(fit, ["x"])
    result = MahalanobisPass(fit=data, layers="tap2").run(loaded)
    used = [s for s in result.report["sites"] if s["status"] == "replaced"]
    assert [s["node"] for s in used] == ["relu_3"] and result.report["found"] == 3
    with pytest.raises(OptionError, match="tap index 5 is out of range"):
        MahalanobisPass(fit=data, layers="5").run(loaded)


def test_input_preprocessing_on_the_torch_path(task, fx_result):
    model, loaded, result, p = fx_result
    split, _, ood_test = task
    x = np.concatenate([split.x_test[:40], ood_test[:40]])
    plain = run(result.model, {"x": x})["ood_score"]
    np.testing.assert_allclose(preprocess(model, p.detector, x, eps=0.0), plain, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(preprocess(loaded, p.detector, x, eps=0.0), plain, rtol=1e-5, atol=1e-4)
    # the rewritten FX program keeps the tap nodes' names, so it works there too
    np.testing.assert_allclose(preprocess(result.model, p.detector, x, eps=0.0), plain, rtol=1e-5, atol=1e-4)
    stepped = preprocess(model, p.detector, x, eps=0.01)
    assert np.all(np.isfinite(stepped)) and not np.allclose(stepped, plain)
    # one step against the gradient of the closest class's distance moves each layer's features closer to it
    assert np.median(stepped[:40] - plain[:40]) < 0
    onnx_like = mio.LoadedModel(kind="onnx", source="m.onnx")
    with pytest.raises(OptionError, match="torch path"):
        preprocess(onnx_like, p.detector, x, eps=0.01)


# ------------------------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    return export_onnx(trained_digits_cnn(), tmp_path_factory.mktemp("cli") / "digits.onnx")


def test_cli_convert_adds_the_ood_score_output(task, onnx_file, tmp_path, capsys):
    _, fit, _ = task
    np.savez(tmp_path / "fit.npz", **fit)
    out = tmp_path / "ood.onnx"
    assert main(["convert", str(onnx_file), "-o", str(out), "--ood", "mahalanobis", "--fit",
                 str(tmp_path / "fit.npz"), "--layers", "0,2"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "higher = more likely out-of-distribution" in text and "ood_score" in text
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "ood_score"]


@pytest.mark.parametrize("case,match", [
    ("no_labels", "no labels"),
    ("empty_class", "classes [9] have no samples"),
    ("bad_shape", "axis 2 differs"),
    ("bad_layers", "out of range"),
    ("no_fit", "needs fitting data"),
])
def test_cli_refuses_bad_input_in_one_line(task, onnx_file, tmp_path, capsys, case, match):
    split, fit, _ = task
    arrays = dict(fit)
    args = []
    if case == "no_labels":
        del arrays["y"]
    elif case == "empty_class":
        keep = fit["y"] != 9
        arrays["x"], arrays["y"] = fit["x"][keep], fit["y"][keep]
    elif case == "bad_shape":
        arrays["x"] = np.zeros((len(fit["y"]), 1, 9, 9), np.float32)
    elif case == "bad_layers":
        args = ["--layers", "3"]
    data = tmp_path / "fit.npz"
    np.savez(data, **arrays)
    out = tmp_path / "out.onnx"
    fit_args = [] if case == "no_fit" else ["--fit", str(data)]
    assert main(["convert", str(onnx_file), "-o", str(out), "--ood", "mahalanobis", *fit_args, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_static_batch_onnx_from_the_torchscript_exporter(task, tmp_path):
    """A legacy export with batch fixed to 1 (Flatten / Gemm, '/stage1/...' names): the taps are found, the scoring
    module is exported at that batch size, and the output is added."""
    split, fit, ood_test = task
    path = tmp_path / "static.onnx"
    torch.onnx.export(trained_digits_cnn(), (torch.from_numpy(split.x_test[:1]),), str(path), dynamo=False,
                      input_names=["x"], output_names=["logits"])
    original = mio.load_model(path)
    new, report = convert(path, ood="mahalanobis", fit=fit)
    assert report["passes"][0]["replaced"] == 3
    scores = []
    for sample in (split.x_test[:5], ood_test[:5]):
        for row in sample:
            before, after = run(original, {"x": row[None]}), run(new, {"x": row[None]})
            assert np.array_equal(before["logits"], after["logits"]) and after["ood_score"].shape == (1,)
            scores.append(float(after["ood_score"][0]))
    assert max(scores[:5]) < min(scores[5:])


def test_onnx_ood_score_shares_the_input_batch_axis(onnx_result, tmp_path):
    import onnx
    path = export(onnx_result[1], tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    dims = proto.graph.output[1].type.tensor_type.shape.dim
    assert proto.graph.output[1].name == "ood_score" and len(dims) == 1 and dims[0].dim_param == batch


def test_the_pass_refuses_missing_or_too_little_data(task):
    split, fit, ood_test = task
    loaded = export_fx(trained_digits_cnn())
    with pytest.raises(FitDataError, match="needs fitting data"):
        MahalanobisPass().run(loaded)
    few = load_fit_data({**fit, "x_ood": ood_test[:3]}, ["x"])
    with pytest.raises(FitDataError, match="too few samples for the OOD validation"):
        MahalanobisPass(fit=few).run(loaded)
    with pytest.raises(OptionError, match="option held_out=1.5"):
        MahalanobisPass(fit=few, options={"held_out": 1.5})
    with pytest.raises(OptionError, match="unknown option"):
        MahalanobisPass(fit=few, options={"sigma": 1})

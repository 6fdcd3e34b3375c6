"""Fitting data (.npz) for the learning passes: the contract of rewrite/fit_data.py, and the generic value capture."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rewrite.fit_data import FitData, FitDataError, check_labels, load_fit_data

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from digits_models import digits_split, export_fx, export_onnx, trained_digits_cnn  # noqa: E402


def _npz(tmp_path, **arrays):
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return path


def test_single_input_alias_and_ood(tmp_path):
    x = np.random.rand(10, 1, 8, 8).astype(np.float32)
    data = load_fit_data(_npz(tmp_path, x=x, y=np.arange(10) % 3, x_ood=x[:4]), ["input"], {"input": (None, 1, 8, 8)})
    assert list(data.inputs) == ["input"] and data.inputs["input"].shape == (10, 1, 8, 8)
    assert data.ood["input"].shape == (4, 1, 8, 8) and data.y.dtype == np.int64


@pytest.mark.parametrize("arrays, message", [
    (dict(x=np.zeros((4, 1, 8, 8), np.float32)), "no labels"),
    (dict(x=np.zeros((4, 1, 8, 8), np.float32), y=np.array([0, 1, 2])), "3 labels but the inputs have 4"),
    (dict(x=np.zeros((4, 1, 8, 8), np.float32), y=np.array([0, 1, -1, 2])), ">= 0"),
    (dict(x=np.zeros((4, 1, 8, 8), np.float32), y=np.array([0, 1.5, 1, 2])), "integers"),
    (dict(x=np.zeros((4, 1, 9, 8), np.float32), y=np.arange(4)), "axis 2 differs"),
    (dict(x=np.zeros((4, 64), np.float32), y=np.arange(4)), "rank 2"),
    (dict(z=np.zeros((4, 1, 8, 8), np.float32), y=np.arange(4)), "no array for model input 'input'"),
    (dict(x=np.full((4, 1, 8, 8), np.nan, np.float32), y=np.arange(4)), "NaN"),
])
def test_bad_data_is_one_named_error(tmp_path, arrays, message):
    path = _npz(tmp_path, **arrays)
    with pytest.raises(FitDataError, match=message) as info:
        load_fit_data(path, ["input"], {"input": (None, 1, 8, 8)})
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(FitDataError, match="not a readable .npz"):
        load_fit_data(bad, ["x"])
    with pytest.raises(FitDataError, match="not found"):
        load_fit_data(tmp_path / "absent.npz", ["x"])
    obj = tmp_path / "obj.npz"
    np.savez(obj, x=np.array([{"a": 1}], dtype=object), y=np.arange(1))
    with pytest.raises(FitDataError, match="not a readable"):  # pickled objects are refused, never unpickled
        load_fit_data(obj, ["x"])


def test_labels_checked_against_the_head():
    data = FitData({"x": np.zeros((6, 2))}, np.array([0, 1, 2, 0, 1, 2]))
    check_labels(data, 3)
    with pytest.raises(FitDataError, match="label 2 is out of range"):
        check_labels(data, 2)
    with pytest.raises(FitDataError, match=r"classes \[3\] have no samples"):
        check_labels(data, 4)


def test_split_is_stratified_and_disjoint():
    y = np.repeat(np.arange(5), 20)
    data = FitData({"x": np.arange(100)[:, None].astype(np.float32)}, y)
    fit, held = data.split(0.25, seed=3)
    assert len(fit) + len(held) == 100 and len(held) == 25
    assert set(np.unique(held.y)) == set(range(5)) and np.bincount(held.y).tolist() == [5] * 5
    assert not set(fit.inputs["x"][:, 0]) & set(held.inputs["x"][:, 0])


@pytest.mark.parametrize("kind", ["fx", "onnx"])
def test_capture_values_equals_the_module_feature(tmp_path, kind):
    """The head's input feature captured over 540 samples in chunks equals the module's own penultimate feature."""
    from rewrite import io as mio
    from rewrite.api import graph_view
    from rewrite.capture import capture_values
    from rewrite.recognize import recognize
    model = trained_digits_cnn()
    loaded = export_fx(model) if kind == "fx" else mio.load_model(export_onnx(model, tmp_path / "d.onnx"))
    g, outs = graph_view(loaded)
    head = recognize(g, outs).heads[0]
    node = next(n for n in g.nodes() if g.node_name(n) == head.node)
    x = digits_split().x_test
    feature = capture_values(loaded, g, [g.canon(node).inputs[0]], {"x": x}, batch=100)[0]
    with torch.no_grad():
        expected = model.features(torch.from_numpy(x)).numpy()
    assert feature.shape == (len(x), 64)
    np.testing.assert_allclose(feature, expected, atol=1e-5)

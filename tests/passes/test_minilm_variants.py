"""The real MiniLM (all-MiniLM-L6-v2) converted with every variant: the report carries site and model fidelity
before any training, and every converted graph runs (FX in torch, ONNX in onnxruntime)."""
from __future__ import annotations

import numpy as np
import pytest

import rewrite
from rewrite.hf import minilm_path
from rewrite.io import load_model
from rewrite.verify import run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm():
    return load_model(minilm_path())


@pytest.fixture(scope="module")
def minilm_onnx(minilm, tmp_path_factory):
    path = tmp_path_factory.mktemp("minilm") / "minilm.onnx"
    rewrite.export(minilm, path)
    return path


def test_minilm_soft_is_refused_with_reason(minilm, tmp_path):
    """SOFT takes no key-padding mask: every MiniLM site is skipped with that reason, nothing written."""
    with pytest.raises(rewrite.NoSitesError, match="key_padding"):
        rewrite.convert(minilm, tmp_path / "m.pt2", attention="soft")
    assert not (tmp_path / "m.pt2").exists()


@pytest.mark.parametrize("variant", ["linear", "mala", "sigmoid", "softplus"])
def test_minilm_each_variant(variant, minilm, minilm_onnx, tmp_path):
    fx_new, report = rewrite.convert(minilm, tmp_path / "m.pt2", attention=variant)
    sites = report["passes"][0]["sites"]
    assert len(sites) == 6
    assert all(s["status"] == "replaced" for s in sites)
    cosines = [s["fidelity"]["cosine"] for s in sites]
    assert all(0.0 < c < 1.0 for c in cosines), cosines  # each site changed, and still correlated with softmax
    model_cos = report["fidelity"]["min_cosine"]
    assert 0.0 < model_cos < 1.0 - 1e-6  # an untrained swap changes the model, measurably
    onnx_new, onnx_report = rewrite.convert(minilm_onnx, tmp_path / "m.onnx", attention=variant)
    feeds = {k: v.numpy() for k, v in minilm.example_inputs.items()}
    for out in run(load_model(tmp_path / "m.onnx"), feeds).values():
        assert np.isfinite(out).all()
    a = list(run(fx_new, feeds).values())[0]
    b = list(run(load_model(tmp_path / "m.onnx"), feeds).values())[0]
    assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(a).max())

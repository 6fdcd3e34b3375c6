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
    # sigmoid's n_ref defaults to the model config's max_position_embeddings (512 for MiniLM); an ONNX file carries no
    # config (2048 then), so FX and ONNX are compared at the same explicit n_ref
    options = {"n_ref": 512} if variant == "sigmoid" else None
    fx_new, report = rewrite.convert(minilm, tmp_path / "m.pt2", attention=variant, options=options)
    sites = report["passes"][0]["sites"]
    assert len(sites) == 6
    assert all(s["status"] == "replaced" for s in sites)
    cosines = [s["fidelity"]["cosine"] for s in sites]
    assert all(0.0 < c < 1.0 for c in cosines), cosines  # each site changed, and still correlated with softmax
    model_cos = report["fidelity"]["min_cosine"]
    assert 0.0 < model_cos < 1.0 - 1e-6  # an untrained swap changes the model, measurably
    onnx_new, onnx_report = rewrite.convert(minilm_onnx, tmp_path / "m.onnx", attention=variant, options=options)
    feeds = {k: v.numpy() for k, v in minilm.example_inputs.items()}
    for out in run(load_model(tmp_path / "m.onnx"), feeds).values():
        assert np.isfinite(out).all()
    a = list(run(fx_new, feeds).values())[0]
    b = list(run(load_model(tmp_path / "m.onnx"), feeds).values())[0]
    assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(a).max())


def test_minilm_sigmoid_n_ref_comes_from_the_config(minilm):
    """Without an n_ref option, the FX (Hugging Face) path takes the config's max_position_embeddings: the same graph
    as n_ref=512 given explicitly, and not the one of the 2048 fallback."""
    feeds = {k: v.numpy() for k, v in minilm.example_inputs.items()}
    default, _ = rewrite.convert(minilm, attention="sigmoid", verify=False)
    explicit, _ = rewrite.convert(minilm, attention="sigmoid", options={"n_ref": 512}, verify=False)
    fallback, _ = rewrite.convert(minilm, attention="sigmoid", options={"n_ref": 2048}, verify=False)
    a, b, c = (list(run(m, feeds).values())[0] for m in (default, explicit, fallback))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3

"""SVM heads on real transformer classifiers of the zoo (BERT for sequence classification, ViT for image
classification): the head site is found on the real architecture, fitted on synthetic labels, and the rewritten
model still exports and runs (onnxruntime), FX and ONNX agreeing."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from rewrite.api import convert, export
from rewrite.io import load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import zoo  # noqa: E402

N = 60


def _data(zm, loaded):
    """N samples of the model's inputs and labels that a linear head can learn: equal-count bins of the original
    model's first logit (a linear function of the head's feature), so every class has samples."""
    built = zm.built()
    inputs = built.make_inputs(N, 12) if "input_ids" in built.input_names else built.make_inputs(N, 0)
    arrays = {name: t.numpy() for name, t in zip(built.input_names, inputs)}
    with torch.no_grad():
        out = loaded.ep.module()(*[torch.from_numpy(arrays[n]) for n in loaded.input_names])
    logits = (out[0] if isinstance(out, (tuple, list)) else out).numpy()
    k = logits.shape[-1]
    ranks = logits[:, 0].argsort().argsort()
    return arrays, (ranks * k // N).astype(np.int64), k


@pytest.mark.parametrize("name", ["hf_bert_cls", "hf_vit_cls"])
def test_svm_head_on_transformer_classifiers(name, tmp_path):
    zm = zoo.get(name)
    fx = load_model(zoo.export_fx(zm))
    arrays, y, k = _data(zm, fx)
    new, report = convert(fx, head="svm", fit={**arrays, "y": y}, options={"progress": False, "tol": 1e-8,
                                                                          "max_iter": 50000})
    row = report["passes"][0]["sites"][0]
    assert row["status"] == "replaced" and row["num_classes"] == k and 0.0 <= row["accuracy_new"] <= 1.0
    feeds = {n: arrays[n][:8] for n in fx.input_names}
    with torch.no_grad():
        fx_out = new.ep.module()(*[torch.from_numpy(feeds[n]) for n in new.input_names])
    fx_out = (fx_out[0] if isinstance(fx_out, (tuple, list)) else fx_out).numpy()
    assert fx_out.shape == (8, k)
    onnx_path = export(new, tmp_path / f"{name}_svm.onnx")
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})[0]
    np.testing.assert_allclose(got, fx_out, atol=1e-4)
    # the ONNX graph kind: the zoo's dynamo export, head replaced in ONNX, runs in onnxruntime
    src = zoo.export_onnx(zm, "dynamo")
    out = tmp_path / f"{name}_onnx_svm.onnx"
    onnx_new, _ = convert(src, out, head="svm", fit={**arrays, "y": y},
                          options={"progress": False, "tol": 1e-8, "max_iter": 50000})
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got_onnx = sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})[0]
    np.testing.assert_allclose(got_onnx, fx_out, atol=1e-4)

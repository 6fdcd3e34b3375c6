"""Zoo models, original and rewritten with each linear-cost variant, lowered with TVM for avx2 and avx512: the
compiled library matches onnxruntime within 1e-4 on the model's own inputs."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import zoo
from rewrite.io import load_onnx
from rewrite.verify import run
from tgt_models import exec_targets, zoo_variant_onnx

MODELS = ["sdpa_causal", "timm_vit_block", "hf_bert_sdpa"]
VARIANTS = [None, "linear", "mala", "sigmoid", "softplus"]


@pytest.mark.parametrize("target", exec_targets())
@pytest.mark.parametrize("variant", VARIANTS, ids=[v or "original" for v in VARIANTS])
@pytest.mark.parametrize("name", MODELS)
def test_zoo_lowering_matches_onnxruntime(name, variant, target, zoo_onnx, tmp_path):
    from targets import compile_model, Runner

    zm = zoo.get(name)
    _, args, _ = zm.build()
    loaded = load_onnx(zoo_onnx(name, "dynamo"))
    feeds = {n: a.numpy() for n, a in zip(loaded.input_names, args)}
    path = zoo_variant_onnx(zoo_onnx(name, "dynamo"), feeds, variant, tmp_path / "model.onnx")
    expected = list(run(load_onnx(path), feeds).values())
    shapes = {n: list(a.shape) for n, a in feeds.items()}
    compile_model(str(path), target, tmp_path / "model.so", shapes=shapes)
    got = list(Runner(tmp_path / "model.so").run(feeds).values())
    for a, b in zip(expected, got):
        assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(a).max())

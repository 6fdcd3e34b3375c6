"""Compile matrix without ``--shape``: zoo families × ONNX exporters (dynamo opset 18, TorchScript opset 17) ×
(original, linear attention), compiled for ``host`` with every input dim left symbolic. One artefact must serve
two different input shapes (the model's example and batch 3 × length 11), each matching onnxruntime within 1e-4."""
from __future__ import annotations

import numpy as np
import pytest

import zoo
from rewrite.io import load_onnx
from rewrite.verify import run
from tgt_models import zoo_variant_onnx

FAMILIES = ["sdpa_causal", "timm_vit_block", "hf_bert_sdpa", "hf_bert_eager", "hf_gpt2_sdpa", "hf_llama_sdpa",
            "hf_vit_cls"]


def _feeds(name: str, loaded, batch: int | None = None, seq: int | None = None) -> dict[str, np.ndarray]:
    zm = zoo.get(name)
    args = zm.build()[1] if batch is None else zm.inputs(batch, seq)
    return {n: a.numpy() for n, a in zip(loaded.input_names, args)}


@pytest.mark.parametrize("variant", [None, "linear"], ids=["original", "linear"])
@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
@pytest.mark.parametrize("name", FAMILIES)
def test_symbolic_build_serves_two_shapes(name, exporter, variant, zoo_onnx, tmp_path):
    from targets import Runner, compile_model

    loaded = load_onnx(zoo_onnx(name, exporter))
    feeds = _feeds(name, loaded)
    path = zoo_variant_onnx(zoo_onnx(name, exporter), feeds, variant, tmp_path / "model.onnx")
    compile_model(str(path), "host", tmp_path / "model.so", shapes=None)
    runner = Runner(tmp_path / "model.so")
    second = _feeds(name, loaded, 3, 11) if zoo.get(name).inputs(3, 11) is not None else None
    for inputs in (feeds, second):
        if inputs is None:
            continue
        expected = list(run(load_onnx(path), inputs).values())
        got = list(runner.run(inputs).values())
        for a, b in zip(expected, got):
            assert a.shape == b.shape
            assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(a).max())

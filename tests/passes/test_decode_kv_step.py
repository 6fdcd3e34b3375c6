"""The original softmax model's KV-cache step as ONNX (:mod:`passes.decode.kv_cache`, the comparison row of
tools/bench/generate.py): from the cache of Hugging Face's own prefill, 8 greedy steps in onnxruntime give the
logits of re-running the unconverted transformers model on the growing sequence (no cache), within 1e-4, for the
zoo's GPT-2 and Llama-GQA; the present keys/values grow by one per step."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode_models import _lm  # noqa: E402

from passes.decode.kv_cache import export_kv_step  # noqa: E402


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kv_step_graph_equals_full_model(family, tmp_path):
    import onnxruntime as ort
    lm = _lm(family)
    lm.save_pretrained(tmp_path / "m")
    info = export_kv_step(tmp_path / "m", tmp_path / "kv")
    sess = ort.InferenceSession(info["path"], providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == info["inputs"]
    prompt = [5, 17, 42, 9]
    with torch.no_grad():
        out = lm(input_ids=torch.tensor([prompt]), use_cache=True)
    past = [t.numpy() for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
    assert past[0].shape == (1, info["kv_heads"], 4, info["head_dim"])
    seq = list(prompt) + [int(out.logits[0, -1].argmax())]
    for _ in range(8):
        feeds = {"input_ids": np.asarray([[seq[-1]]], dtype=np.int64),
                 "positions": np.asarray([[len(seq) - 1]], dtype=np.int64)}
        feeds.update(zip(info["inputs"][2:], past))
        logits, *past = sess.run(None, feeds)
        assert past[0].shape[2] == len(seq)
        with torch.no_grad():
            ref = lm(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].numpy()
        assert np.abs(logits[0, 0] - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
        seq.append(int(ref.argmax()))

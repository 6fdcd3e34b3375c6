"""The tiny random BERT the transfer tests fit (2 layers, hidden 32, 4 heads, sdpa), exported as an FX model with
its Hugging Face wrapper attached (as a model folder would be)."""
from __future__ import annotations

from pathlib import Path

import torch

from rewrite.io import LoadedModel, export_module


def tiny_bert(sharpen: float = 4.0) -> LoadedModel:
    """Seeded tiny BERT; query/key weights scaled by ``sharpen`` so its attention is peaked enough for the linear
    variants to have something to learn (1.0 leaves the random initialisation as it is)."""
    from transformers import BertConfig, BertModel

    from rewrite.hf import wrap_hf_model
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, attn_implementation="sdpa")
    model = BertModel(cfg)
    if sharpen != 1.0:
        with torch.no_grad():
            for layer in model.encoder.layer:
                layer.attention.self.query.weight.mul_(sharpen)
                layer.attention.self.key.weight.mul_(sharpen)
    hf = wrap_hf_model(model, batch=2, seq=16)
    loaded = export_module(hf.module, hf.example_inputs, dynamic_shapes=hf.dynamic_shapes, source="tiny-bert",
                           output_names=hf.output_names)
    loaded.extra["hf"] = hf
    return loaded


def tiny_bert_onnx_with_calibration(folder: Path, rows: int = 20, tokens: int = 12, seed: int = 5
                                    ) -> tuple[Path, Path]:
    """``folder/tiny.onnx`` (the tiny BERT exported to ONNX) and ``folder/cal.npz`` (``rows`` × ``tokens`` of its
    Hugging Face inputs, seeded): the model file and calibration data of the distributed-transfer tests."""
    import numpy as np
    import onnx_ir as ir

    from rewrite.io import fx_to_onnx, load_model
    fx = tiny_bert()
    ir.save(load_model(fx_to_onnx(fx)).onnx, folder / "tiny.onnx")
    feeds = {k: v.numpy() for k, v in fx.extra["hf"].make_inputs(rows, tokens, seed=seed).items()}
    np.savez(folder / "cal.npz", **feeds)
    return folder / "tiny.onnx", folder / "cal.npz"

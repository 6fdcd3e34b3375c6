"""A tiny Hugging Face ViT trained on scikit-learn's digits (8×8, one channel, patch 2 → 16 patches + CLS), for the
BiViT tests and benchmark: trained in-process (deterministic, cached per process, ~15 s on one core; ~92% test accuracy).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests.digits_models import NUM_CLASSES, digits_split


def vit_config(hidden: int = 32, layers: int = 2, heads: int = 4) -> Any:
    from transformers import ViTConfig
    return ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=2 * hidden, num_labels=NUM_CLASSES,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@functools.lru_cache(maxsize=None)
def _trained_state(seed: int, epochs: int, hidden: int, layers: int) -> dict[str, torch.Tensor]:
    from transformers import ViTForImageClassification
    torch.manual_seed(seed)
    model = ViTForImageClassification(vit_config(hidden, layers))
    split = digits_split()
    x, y = torch.from_numpy(split.x_train), torch.from_numpy(split.y_train)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(pixel_values=x[idx]).logits, y[idx]).backward()
            opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def trained_digits_vit(seed: int = 0, epochs: int = 20, hidden: int = 32, layers: int = 2) -> Any:
    """A fresh ``ViTForImageClassification`` (eval) with the cached weights of one training run on the train split."""
    from transformers import ViTForImageClassification
    model = ViTForImageClassification(vit_config(hidden, layers))
    model.load_state_dict(_trained_state(seed, epochs, hidden, layers))
    return model.eval()


def save_digits_vit(folder: Path, **kwargs: Any) -> Path:
    """Write the trained ViT as a Hugging Face folder (config.json + safetensors); returns the folder."""
    trained_digits_vit(**kwargs).save_pretrained(folder)
    return Path(folder)


def vit_accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of an HF ViT (``.logits``) or any callable returning logits (or a tuple of them)."""
    with torch.no_grad():
        out = model(torch.from_numpy(x))
    logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)
    return float((logits.argmax(-1).numpy() == y).mean())


def write_digits_npz(path: Path, labels: bool = True, name: str = "pixel_values") -> Path:
    """The digits train split as fitting data (``pixel_values`` (N,1,8,8) float32, ``y`` when ``labels``)."""
    split = digits_split()
    arrays = {name: split.x_train}
    if labels:
        arrays["y"] = split.y_train
    np.savez(path, **arrays)
    return Path(path)


#: A dynamic batch axis for exports of the ViT.
DYNAMIC_BATCH = {"pixel_values": {0: torch.export.Dim("batch", min=1, max=4096)}}


def export_vit(model: Any) -> Any:
    """An HF ViT as a softswap FX LoadedModel (input ``pixel_values``, dynamic batch)."""
    from rewrite.io import export_module
    x = torch.from_numpy(digits_split().x_test[:4])
    return export_module(model.eval(), {"pixel_values": x}, dynamic_shapes=DYNAMIC_BATCH, source="<digits-vit>")


def untrained_vit(seed: int = 0, hidden: int = 32, layers: int = 2) -> Any:
    from transformers import ViTForImageClassification
    torch.manual_seed(seed)
    return ViTForImageClassification(vit_config(hidden=hidden, layers=layers)).eval()


def fx_logits(loaded: Any, x: np.ndarray) -> np.ndarray:
    """Logits of an FX LoadedModel of the ViT on images ``x`` (N, 1, 8, 8)."""
    with torch.no_grad():
        out = loaded.ep.module()(pixel_values=torch.from_numpy(x))
    out = out.logits if hasattr(out, "logits") else out
    return (out[0] if isinstance(out, (tuple, list)) else out).numpy()

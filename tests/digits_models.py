"""A real small task for the head, OOD and binarization tests: scikit-learn's digits (1,797 8×8 images, 10 classes)
and a small CNN trained on it in-process (deterministic, a few seconds on 2 cores, cached per test process).

The CNN keeps the usual classifier shape: ``features`` (conv stages, global average pool, a hidden Linear + ReLU)
then ``head`` (Linear(64, 10)) producing logits, so the head recognizer sees a real penultimate feature.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

NUM_CLASSES = 10


@dataclass(frozen=True)
class DigitsSplit:
    """Images as float32 (N, 1, 8, 8) in [0, 1], labels int64 (N,): a stratified train / test split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@functools.lru_cache(maxsize=None)
def digits_split(seed: int = 0, test_fraction: float = 0.3) -> DigitsSplit:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None]
    y = data.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return DigitsSplit(xtr, ytr, xte, yte)


class DigitsCNN(nn.Module):
    """conv(1→16) → conv(16→32) → pool → conv(32→64) → global mean → Linear(64, 64) + ReLU → head Linear(64, 10).
    ``softmax=True`` puts a softmax on the output (the head recognizer absorbs it)."""

    def __init__(self, softmax: bool = False, hidden: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU())
        self.neck = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, NUM_CLASSES)
        self.softmax = softmax

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate feature (N, hidden)."""
        h = self.stage2(self.stage1(self.stem(x)))
        return self.neck(h.mean(dim=(2, 3), keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.features(x))
        return torch.softmax(logits, dim=-1) if self.softmax else logits


def _train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int, lr: float = 3e-3) -> nn.Module:
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            opt.zero_grad()
            logits = model.head(model.features(xt[idx]))
            nn.functional.cross_entropy(logits, yt[idx]).backward()
            opt.step()
    return model.eval()


@functools.lru_cache(maxsize=None)
def _trained_state(seed: int, epochs: int) -> dict[str, torch.Tensor]:
    split = digits_split()
    torch.manual_seed(seed)
    model = _train(DigitsCNN(), split.x_train, split.y_train, epochs, seed)
    return {k: v.clone() for k, v in model.state_dict().items()}


def trained_digits_cnn(softmax: bool = False, seed: int = 0, epochs: int = 30) -> DigitsCNN:
    """A fresh DigitsCNN with the (cached) weights of one training run on the digits train split."""
    model = DigitsCNN(softmax=softmax)
    model.load_state_dict(_trained_state(seed, epochs))
    return model.eval()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(-1).numpy()
    return float((pred == y).mean())


def export_fx(model: nn.Module, batch: int = 4) -> Any:
    """The model as a softswap FX LoadedModel with a dynamic batch axis (input ``x``, output ``logits``)."""
    from rewrite.io import export_module
    x = torch.from_numpy(digits_split().x_test[:batch])
    dyn = {"x": {0: torch.export.Dim("batch", min=1, max=4096)}}
    return export_module(model, {"x": x}, dynamic_shapes=dyn, source="<digits-cnn>", output_names=["logits"])


def export_onnx(model: nn.Module, path: Any, batch: int = 4) -> Any:
    """Write the model as ONNX (dynamic batch) at ``path``; returns the path."""
    from rewrite.api import export
    return export(export_fx(model, batch), path)

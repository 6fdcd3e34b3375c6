"""Z-loss head (de Brébisson & Vincent, arXiv 1604.08859): logits o kept; z = (o − μ)/(σ + ε) per sample with the
population std (correction 0); per-class confidence conf_k = sigmoid(a (z_k − b)).

z is a positive affine map of o per sample, so ``argmax z = argmax o`` and the decision is unchanged. |z_k| ≤ √(K−1).
K = 2 is degenerate (z = ±1 for every input, so the loss has zero gradient) and is refused.
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import HeadShapeError

#: Defaults of the authors' reference code: sharpness a, location b, the σ guard ε.
DEFAULT_A, DEFAULT_B, DEFAULT_EPS = 1.0, 0.0, 1e-12


def check_classes(num_classes: int, where: str = "the head") -> None:
    """Raise :class:`HeadShapeError` unless K ≥ 3 (K = 2 makes z = ±1 for every input)."""
    if num_classes < 3:
        raise HeadShapeError(f"{where}: a Z-loss head needs at least 3 classes, got K = {num_classes} (for K = 2, "
                             "z = ±1 for every input and the Z-loss has zero gradient)")


def zscore(logits: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """z = (o − mean_k o)/(std_k o + ε) over the last axis, population std (correction 0)."""
    mu = logits.mean(dim=-1, keepdim=True)
    centred = logits - mu
    sigma = (centred * centred).mean(dim=-1, keepdim=True).sqrt()
    return centred / (sigma + eps)


def confidence(z: torch.Tensor, a: float = DEFAULT_A, b: float = DEFAULT_B) -> torch.Tensor:
    """Per-class confidence sigmoid(a (z − b)) (each in (0, 1); they do not sum to 1)."""
    return torch.sigmoid(a * (z - b))


class ZLossHead(nn.Module):
    """``Linear(D, K)`` giving logits o; with ``extras`` the forward returns (o, z, confidence)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, a: float = DEFAULT_A, b: float = DEFAULT_B,
                 eps: float = DEFAULT_EPS, extras: bool = False) -> None:
        super().__init__()
        check_classes(int(weight.shape[0]))
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone())
        self.a, self.b, self.eps, self.extras = float(a), float(b), float(eps), bool(extras)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weight.to(features.dtype).transpose(0, 1) + self.bias.to(features.dtype)

    def forward(self, features: torch.Tensor):  # -> Tensor | tuple[Tensor, Tensor, Tensor]
        o = self.logits(features)
        if not self.extras:
            return o
        z = zscore(o, self.eps)
        return o, z, confidence(z, self.a, self.b)

"""Training losses of the replacement heads, for users who train end to end (and for the head fitting).

- :func:`squared_hinge`: L2-SVM one-vs-rest, L = λ·½‖W‖²_F + C · mean_{n,k} max(0, 1 − t_nk s_nk)², t = ±1.
  Presets: ``agarap`` (λ = 2/(K·D), so the penalty is mean(W²), as CNN-SVM) and ``tang`` (sum over samples instead
  of the mean, λ = 1).
- :func:`zloss`: L_Z = (1/a) softplus(a (b − z_y)), z the population-std Z-score of the logits (shift and scale
  invariant).
- :func:`fourier_nll`: cross-entropy on a Fourier head's logits plus its regulariser (actually added).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from rewrite.errors import OptionError

from .zloss import DEFAULT_A, DEFAULT_B, DEFAULT_EPS, check_classes, zscore

SVM_PRESETS = ("none", "agarap", "tang")


def one_vs_rest_targets(labels: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """t_nk = +1 if y_n = k else −1, shape (N, K)."""
    return F.one_hot(labels.long(), num_classes).to(dtype) * 2.0 - 1.0


def squared_hinge(margins: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None, C: float = 1.0,
                  lam: float = 1.0, preset: str = "none") -> torch.Tensor:
    """Squared-hinge SVM loss of ``margins`` (N, K) for integer ``labels`` (N,), with the L2 penalty on ``weight``
    (K, D) when given (the bias is not penalised). See the module docstring for the presets."""
    if preset not in SVM_PRESETS:
        raise OptionError(f"SVM loss preset {preset!r}: expected one of {', '.join(SVM_PRESETS)}")
    k = margins.shape[-1]
    t = one_vs_rest_targets(labels, k, margins.dtype)
    hinge = torch.clamp(1.0 - t * margins, min=0.0) ** 2
    data = hinge.sum() if preset == "tang" else hinge.mean()
    loss = C * data
    if weight is not None:
        if preset == "agarap":
            lam = 2.0 / (weight.shape[0] * weight.shape[1])
        elif preset == "tang":
            lam = 1.0
        loss = loss + lam * 0.5 * (weight * weight).sum()
    return loss


def zloss(logits: torch.Tensor, labels: torch.Tensor, a: float = DEFAULT_A, b: float = DEFAULT_B,
          eps: float = DEFAULT_EPS, reduction: str = "mean") -> torch.Tensor:
    """L_Z(o, y) = (1/a) softplus(a (b − z_y)); ``reduction`` "mean", "sum" (the authors' code) or "none"."""
    check_classes(int(logits.shape[-1]), "Z-loss")
    if not a > 0:
        raise OptionError(f"Z-loss sharpness a={a}: must be > 0")
    z = zscore(logits, eps)
    z_y = z.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    per = F.softplus(a * (b - z_y)) / a
    return _reduce(per, reduction)


def fourier_nll(logits: torch.Tensor, target: torch.Tensor, reg: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Cross-entropy of Fourier-head logits (log(q + ε)) against integer labels (N,) or target distributions (N, m),
    plus the head's regulariser ``reg`` (from :meth:`FourierHead.logits_and_reg`)."""
    return F.cross_entropy(logits, target) + reg


def fourier_loss(head: Any, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CE + R for a :class:`~passes.heads.fourier.FourierHead` on ``features``."""
    logits, reg = head.logits_and_reg(features)
    return fourier_nll(logits, target, reg)


def _reduce(per: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per.mean()
    if reduction == "sum":
        return per.sum()
    if reduction == "none":
        return per
    raise OptionError(f"reduction {reduction!r}: expected mean, sum or none")

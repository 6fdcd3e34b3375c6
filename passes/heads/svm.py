"""L2-SVM one-vs-rest head (Tang 2013; Agarap CNN-SVM): margins s = W f + b, decision argmax s.

The decision is ``argmax`` of the margins, never ``argmax(sign(s))`` (which ties whenever two or more margins are
positive or all are negative, and then picks index 0). Margins are not probabilities.

Post-hoc fitting uses scikit-learn's ``LinearSVC`` (squared hinge, L2 penalty, one-vs-rest) with its defaults
(C = 1, tol = 1e-4, fit_intercept, intercept_scaling = 1, max_iter = 1000) in float64. A two-class ``LinearSVC`` has
one row w, b (positive = class 1); it is mapped to margins (−s, +s) so the head keeps K = 2 outputs. Optional
standardisation of the features is folded into the head: W' = W diag(1/σ), b' = b − W (μ/σ).
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rewrite.errors import DependencyError

log = logging.getLogger(__name__)


def svm_margins(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Margins s = f Wᵀ + b: ``features`` (N, D), ``weight`` (K, D), ``bias`` (K,) → (N, K)."""
    return features @ weight.transpose(0, 1) + bias


def svm_predict(margins: torch.Tensor) -> torch.Tensor:
    """The class decision of an SVM head: ``argmax`` over the last axis of the margins (never of their sign)."""
    return margins.argmax(dim=-1)


class SVMHead(nn.Module):
    """``Linear(D, K)`` producing one-vs-rest margins; no softmax. ``forward`` returns the margins (N, K), or
    (margins, decision) with ``decision`` (the int64 class, argmax of the margins) when ``with_decision``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, with_decision: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone())
        self.with_decision = with_decision

    def forward(self, features: torch.Tensor):  # -> Tensor | tuple[Tensor, Tensor]
        margins = svm_margins(features, self.weight.to(features.dtype), self.bias.to(features.dtype))
        return (margins, svm_predict(margins)) if self.with_decision else margins

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return svm_predict(self(features))


@dataclass
class SVMFit:
    """A post-hoc fit: the head's float64 weight (K, D) and bias (K,), whether the features were standardised (and
    folded in), whether liblinear converged, and its iteration count."""

    weight: torch.Tensor
    bias: torch.Tensor
    standardized: bool
    converged: bool
    iterations: int


def fold_scaler(weight: np.ndarray, bias: np.ndarray, mean: np.ndarray, scale: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Fold a feature standardisation (f − μ)/σ into a linear head: W' = W diag(1/σ), b' = b − W (μ/σ)."""
    w = weight / scale[None, :]
    return w, bias - weight @ (mean / scale)


def binary_rows(coef: np.ndarray, intercept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A two-class ``LinearSVC`` (one row, positive = class 1) as two margins (−s, +s)."""
    return np.concatenate([-coef, coef], axis=0), np.concatenate([-intercept, intercept])


def fit_linear_svc(features: np.ndarray, labels: np.ndarray, num_classes: int, *, C: float = 1.0,
                   tol: float = 1e-4, max_iter: int = 1000, standardize: bool = False, seed: int = 0) -> SVMFit:
    """Fit ``LinearSVC`` (scikit-learn defaults unless given) on frozen ``features`` (N, D) with labels in
    ``0..num_classes-1`` (every class present) and return the equivalent head in float64.

    A ``ConvergenceWarning`` is not swallowed: it is logged as a warning and returned as ``converged=False`` so the
    caller reports it (raise ``max_iter`` to fix it).
    """
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import LinearSVC
    except ImportError as exc:  # pragma: no cover - environment dependent
        raise DependencyError(f"the SVM head's post-hoc fit needs scikit-learn ({exc}); "
                              "pip install 'softswap[heads]'") from None
    x = np.asarray(features, dtype=np.float64)
    mean = scale = None
    if standardize:
        scaler = StandardScaler().fit(x)
        mean, scale = scaler.mean_, scaler.scale_  # zero-variance features get scale 1
        x = scaler.transform(x)
    svc = LinearSVC(C=C, tol=tol, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        svc.fit(x, np.asarray(labels))
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    if not converged:
        log.warning("LinearSVC did not converge in max_iter=%d iterations; the margins are approximate "
                    "(raise the head option max_iter)", max_iter)
    coef, intercept = svc.coef_.astype(np.float64), svc.intercept_.astype(np.float64)
    if num_classes == 2:
        coef, intercept = binary_rows(coef, intercept)
    if standardize:
        coef, intercept = fold_scaler(coef, intercept, mean, scale)
    n_iter = int(np.max(svc.n_iter_)) if np.ndim(svc.n_iter_) else int(svc.n_iter_)
    return SVMFit(torch.from_numpy(coef), torch.from_numpy(intercept), standardize, converged, n_iter)

"""Layer weights of the Mahalanobis ensemble: ood_score = −(Σ_ℓ α_ℓ M_ℓ + α_0), HIGHER = MORE LIKELY OOD.

Layer scores are first z-scored with the in-distribution mean m_ℓ and standard deviation s_ℓ (Z_ℓ = (M_ℓ − m_ℓ)/s_ℓ):

- with OOD validation data: a logistic regression (scikit-learn ``LogisticRegressionCV``, L2, C by 5-fold log-loss)
  of P(in-distribution | Z) gives β, b; the OOD score is the negated logit −(Σ β_ℓ Z_ℓ + b);
- without: β_ℓ = 1/L, b = 0 (equal weights on the z-scored scores).

Both are folded into weights on the raw scores: α_ℓ = β_ℓ / s_ℓ, α_0 = b − Σ β_ℓ m_ℓ / s_ℓ.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class LayerWeights:
    """``alpha`` (L,) and ``bias`` α_0 on raw layer scores; ``beta`` (L,) the weights on z-scored scores;
    ``method``: ``"logistic"`` or ``"equal"``."""

    alpha: np.ndarray
    bias: float
    beta: np.ndarray
    method: str

    def ood_score(self, layer_scores: np.ndarray) -> np.ndarray:
        """ood_score (N,) from raw layer scores (N, L): −(Σ α_ℓ M_ℓ + α_0)."""
        return -(np.asarray(layer_scores, dtype=np.float64) @ self.alpha + self.bias)


def _standardizer(scores_in: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = scores_in.mean(axis=0)
    std = scores_in.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return mean, std


def fit_weights(scores_in: np.ndarray, scores_out: np.ndarray | None = None, seed: int = 0) -> LayerWeights:
    """Layer weights from layer scores (N, L) of in-distribution validation samples and, when given, OOD validation
    samples (the logistic regression); otherwise equal weights on z-scored scores."""
    scores_in = np.asarray(scores_in, dtype=np.float64)
    mean, std = _standardizer(scores_in)
    n_layers = scores_in.shape[1]
    if scores_out is None or len(scores_out) == 0:
        beta, b, method = np.full(n_layers, 1.0 / n_layers), 0.0, "equal"
    else:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegressionCV
        z = (np.concatenate([scores_in, np.asarray(scores_out, dtype=np.float64)]) - mean) / std
        label = np.concatenate([np.ones(len(scores_in)), np.zeros(len(scores_out))])
        folds = int(min(5, len(scores_in), len(scores_out)))
        if folds < 2:
            raise ValueError("the logistic-regression ensemble needs at least 2 in-distribution and 2 OOD "
                             "validation samples")
        reg = LogisticRegressionCV(Cs=10, l1_ratios=(0.0,), scoring="neg_log_loss", cv=folds, solver="lbfgs",
                                   max_iter=2000, random_state=seed, use_legacy_attributes=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=ConvergenceWarning)  # lbfgs on (nearly) separable data
            reg.fit(z, label)
        beta, b, method = np.asarray(reg.coef_, dtype=np.float64).reshape(-1), float(np.ravel(reg.intercept_)[0]), \
            "logistic"
    alpha = beta / std
    return LayerWeights(alpha=alpha, bias=float(b - np.sum(beta * mean / std)), beta=beta, method=method)

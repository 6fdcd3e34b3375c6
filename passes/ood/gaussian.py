"""Class-conditional Gaussians with a tied covariance (Lee et al. 2018, arXiv 1807.03888) and the per-layer score.

Written once, in float64 numpy:

- class means μ_c = (1/N_c) Σ_{y_i = c} f_i;
- tied covariance Σ = (1/N) Σ_c Σ_{y_i = c} (f_i − μ_c)(f_i − μ_c)ᵀ (maximum likelihood, divided by N, not N − 1);
- precision P = pinvh(Σ + λ·(tr Σ / D)·I) (``scipy.linalg.pinvh``: a singular Σ, e.g. from sparse ReLU features or
  more features than samples, gets the pseudo-inverse, never a float32 ``inv``); λ is the ``ridge`` relative to the
  mean eigenvalue tr Σ / D, so it does not depend on the features' scale;
- score M(f) = max_c −(f − μ_c)ᵀ P (f − μ_c) = max_c −d²_c. The paper writes −d²; the official code uses −½ d².
  We use −d² (the paper's form): the factor only rescales what the ensemble's weights absorb.

M is evaluated through a whitening matrix W with P = W Wᵀ: d²_c = ‖(f − μ_c) W‖², a sum of squares (no
cancellation between large terms), the same form the emitted scoring module uses.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.linalg import eigh, pinvh

from rewrite.fit_data import FitDataError

log = logging.getLogger(__name__)

#: Default relative ridge when some class has fewer samples than features (D > N_c): λ · tr(Σ)/D is added to Σ.
AUTO_RIDGE = 1e-3


@dataclass
class ClassGaussian:
    """One layer's fitted model: ``means`` (K, D), ``covariance`` (D, D), ``precision`` (D, D), ``whitening`` (D, R)
    with precision = whitening·whiteningᵀ (R = rank of the precision), ``ridge`` (the λ used), all float64."""

    means: np.ndarray
    covariance: np.ndarray
    precision: np.ndarray
    whitening: np.ndarray
    ridge: float

    @property
    def features(self) -> int:
        return int(self.means.shape[1])

    def distances(self, f: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distances d²_c (N, K) of features ``f`` (N, D) to every class mean."""
        z = np.asarray(f, dtype=np.float64) @ self.whitening
        m = self.means @ self.whitening
        return ((z[:, None, :] - m[None, :, :]) ** 2).sum(-1)

    def score(self, f: np.ndarray) -> np.ndarray:
        """M(f) = max_c −d²_c, shape (N,): 0 at a class mean (its maximum), more negative farther away."""
        return -self.distances(f).min(axis=1)


def tied_covariance(f: np.ndarray, y: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(class means (K, D), tied ML covariance (D, D)) of features ``f`` (N, D) with labels ``y`` in 0..K−1, float64.
    A class with no samples is a :class:`~rewrite.fit_data.FitDataError` naming it."""
    f = np.asarray(f, dtype=np.float64)
    if f.ndim != 2:
        raise FitDataError(f"features must be (N, D), got shape {f.shape}")
    counts = np.bincount(y, minlength=num_classes)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise FitDataError(f"classes {empty[:10].tolist()} have no samples in the fitting data; class means need "
                           "at least one sample per class")
    means = np.zeros((num_classes, f.shape[1]))
    np.add.at(means, y, f)
    means /= counts[:, None]
    centred = f - means[y]
    return means, centred.T @ centred / f.shape[0]


def fit_gaussian(f: np.ndarray, y: np.ndarray, num_classes: int, ridge: float | str = "auto") -> ClassGaussian:
    """Fit :class:`ClassGaussian` to features ``f`` (N, D), labels ``y``. ``ridge``: a float λ ≥ 0 (relative to
    tr Σ / D) or ``"auto"`` (:data:`AUTO_RIDGE` when D exceeds the smallest class count, else 0)."""
    means, cov = tied_covariance(f, y, num_classes)
    d = cov.shape[0]
    if ridge == "auto":
        lam = AUTO_RIDGE if d > int(np.bincount(y, minlength=num_classes).min()) else 0.0
    else:
        lam = float(ridge)
        if not np.isfinite(lam) or lam < 0:
            raise ValueError(f"ridge={ridge!r}: expected a number >= 0 or 'auto'")
    scale = float(np.trace(cov)) / d if d else 0.0
    reg = cov + (lam * scale) * np.eye(d) if lam > 0 and scale > 0 else cov
    precision = pinvh(reg)
    precision = (precision + precision.T) / 2
    vals, vecs = eigh(precision)
    keep = vals > max(float(vals.max(initial=0.0)), 0.0) * d * np.finfo(np.float64).eps
    whitening = vecs[:, keep] * np.sqrt(vals[keep])
    if not keep.any():
        log.warning("covariance of %d features is zero: every sample scores 0", d)
        whitening = np.zeros((d, 1))
    return ClassGaussian(means=means, covariance=cov, precision=precision, whitening=whitening, ridge=lam)

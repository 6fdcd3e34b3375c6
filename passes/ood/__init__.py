"""Out-of-distribution scoring: the Mahalanobis detector (Lee et al. 2018) added as a graph output ``ood_score``.

``ood_score`` is HIGHER for inputs MORE LIKELY OUT-OF-DISTRIBUTION. Modules: :mod:`.gaussian` (class means, tied
covariance, precision, layer score), :mod:`.ensemble` (layer weights), :mod:`.metrics` (AUROC, TNR at 95% TPR,
detection accuracy, AUPR-in/out), :mod:`.detector` (the fitted detector and its torch scoring module),
:mod:`.preprocess` (the input pre-processing variant, torch only), :mod:`.mahalanobis_pass` (pass
``ood.mahalanobis``).
"""
from __future__ import annotations

from .detector import MahalanobisDetector, ScoreModule
from .gaussian import ClassGaussian, fit_gaussian, tied_covariance
from .metrics import METRICS, ood_metrics
from .preprocess import preprocess

__all__ = ["ClassGaussian", "MahalanobisDetector", "METRICS", "ScoreModule", "fit_gaussian", "ood_metrics",
           "preprocess", "register", "tied_covariance"]


def register() -> None:
    """Register pass ``ood.mahalanobis`` with the engine."""
    from rewrite.passes import register_pass

    from .mahalanobis_pass import OPTIONS, MahalanobisPass, make_pass
    register_pass(MahalanobisPass.name, make_pass, MahalanobisPass.description, OPTIONS)

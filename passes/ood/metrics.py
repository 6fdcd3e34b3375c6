"""The five OOD detection metrics of Lee et al. (2018), from scores where HIGHER = MORE LIKELY OUT-OF-DISTRIBUTION.

In-distribution samples are the positives of TPR (as in the paper: TNR at 95% TPR counts in-distribution samples
kept at a threshold that keeps 95% of them). All values are fractions in [0, 1].

- ``auroc``: area under the ROC curve of separating OOD from in-distribution (0.5 = chance);
- ``tnr_at_tpr95``: the fraction of OOD samples rejected at the threshold keeping 95% of in-distribution samples;
- ``detection_accuracy``: max over thresholds of ½(TPR + TNR) (balanced accuracy);
- ``aupr_in``: average precision with in-distribution as the positive class (scored by −ood_score);
- ``aupr_out``: average precision with OOD as the positive class (scored by ood_score).
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

METRICS = ("auroc", "tnr_at_tpr95", "detection_accuracy", "aupr_in", "aupr_out")


def ood_metrics(score_in: np.ndarray, score_out: np.ndarray) -> dict[str, float]:
    """The five metrics for OOD scores of in-distribution samples ``score_in`` and OOD samples ``score_out``."""
    s_in = np.asarray(score_in, dtype=np.float64).ravel()
    s_out = np.asarray(score_out, dtype=np.float64).ravel()
    if not len(s_in) or not len(s_out):
        raise ValueError("OOD metrics need at least one in-distribution and one OOD sample")
    scores = np.concatenate([s_in, s_out])
    is_out = np.concatenate([np.zeros(len(s_in)), np.ones(len(s_out))])
    # in-distribution is the positive class of TPR: threshold t keeps a sample as "in" when ood_score <= t
    fpr_out, tpr_out, _ = roc_curve(is_out, scores)  # tpr_out = OOD rejected, fpr_out = in-distribution rejected
    tpr_in = 1.0 - fpr_out
    tnr = tpr_out
    ok = tpr_in >= 0.95
    tnr95 = float(tnr[ok].max()) if ok.any() else 0.0
    return {"auroc": float(roc_auc_score(is_out, scores)),
            "tnr_at_tpr95": tnr95,
            "detection_accuracy": float(np.max(0.5 * (tpr_in + tnr))),
            "aupr_in": float(average_precision_score(1 - is_out, -scores)),
            "aupr_out": float(average_precision_score(is_out, scores))}


def format_metrics(metrics: dict[str, float]) -> str:
    """``AUROC 97.1  TNR@TPR95 80.2  det.acc 92.0  AUPR-in 96.5  AUPR-out 97.3`` (percent)."""
    names = {"auroc": "AUROC", "tnr_at_tpr95": "TNR@TPR95", "detection_accuracy": "det.acc", "aupr_in": "AUPR-in",
             "aupr_out": "AUPR-out"}
    return "  ".join(f"{names[k]} {100 * metrics[k]:.1f}" for k in METRICS)

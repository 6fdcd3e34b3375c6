"""One fidelity metric for every comparison softswap reports (a site's output, a model's outputs)."""
from __future__ import annotations

from typing import Any

import numpy as np


def _array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def fidelity(reference: Any, candidate: Any) -> dict[str, float]:
    """Cosine similarity, relative error ‖c − r‖ / ‖r‖ (Frobenius; ‖c‖ when r = 0), max abs and max relative
    error (|c − r| / (|r| + 1e-6)) of two arrays or tensors of one shape, in float64."""
    r, c = _array(reference), _array(candidate)
    diff = np.abs(c - r)
    norm_r = float(np.linalg.norm(r))
    denom = norm_r * float(np.linalg.norm(c))
    cos = float(r.ravel() @ c.ravel()) / denom if denom > 0 else float(diff.max(initial=0) == 0)
    return {"cosine": cos, "rel_error": float(np.linalg.norm(c - r)) / norm_r if norm_r > 0 else float(np.linalg.norm(c)),
            "max_abs": float(diff.max(initial=0)), "max_rel": float((diff / (np.abs(r) + 1e-6)).max(initial=0))}

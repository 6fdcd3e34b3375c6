"""The fitted Mahalanobis detector and the torch module that computes its ``ood_score`` inside a graph.

Contract of the score: ``ood_score`` (shape (B,), the model's float dtype) is HIGHER for inputs MORE LIKELY
OUT-OF-DISTRIBUTION: ood_score = −(Σ_ℓ α_ℓ M_ℓ + α_0), with M_ℓ = max_c −d²_c the layer scores (see
:mod:`.gaussian`) and α from :mod:`.ensemble`. With the logistic-regression ensemble it is the negated logit of
P(in-distribution).

:class:`ScoreModule` is plain torch (pooling, Sub/MatMul/ReduceSum/ReduceMax per layer, a weighted sum), so the
same math runs in eager, in an exported FX program and, exported by the torch ONNX exporter, in onnxruntime. It
computes in float64 (the features are cast first) and returns the model's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .ensemble import LayerWeights
from .gaussian import ClassGaussian

#: Pooling of a tap value into one feature vector per sample (FeatureTap.pool).
POOLS = ("spatial_mean", "token_mean", "cls", "none")


def pool_numpy(x: np.ndarray, pool: str) -> np.ndarray:
    """The pooled (N, D) float64 features of a captured tap value ``x`` (see :data:`POOLS`)."""
    x = np.asarray(x, dtype=np.float64)
    if pool == "spatial_mean":
        return x.reshape(x.shape[0], x.shape[1], -1).mean(axis=2)
    if pool == "token_mean":
        return x.mean(axis=1)
    if pool == "cls":
        return x[:, 0]
    if pool == "none":
        return x.reshape(x.shape[0], -1)
    raise ValueError(f"unknown pooling {pool!r}; expected one of {', '.join(POOLS)}")


def pool_torch(x: torch.Tensor, pool: str) -> torch.Tensor:
    """:func:`pool_numpy` in torch (graph ops: ReduceMean / Gather / Reshape when exported)."""
    if pool == "spatial_mean":
        return x.mean(dim=tuple(range(2, x.dim())))
    if pool == "token_mean":
        return x.mean(dim=1)
    if pool == "cls":
        return x[:, 0]
    if pool == "none":
        return x.flatten(1)
    raise ValueError(f"unknown pooling {pool!r}; expected one of {', '.join(POOLS)}")


@dataclass
class MahalanobisDetector:
    """Everything fitted: per tap its node name, pooling and :class:`ClassGaussian`; the ensemble weights.

    ``score_layers`` / ``ood_score`` take pooled-or-raw captured tap values (a list aligned with ``taps``)."""

    taps: list[str]
    pools: list[str]
    layers: list[ClassGaussian]
    weights: LayerWeights
    dtype: torch.dtype = torch.float32
    info: dict[str, Any] = field(default_factory=dict)

    def layer_scores(self, values: Sequence[np.ndarray]) -> np.ndarray:
        """Raw layer scores M_ℓ (N, L), float64, from the captured tap values."""
        return self.feature_scores([pool_numpy(v, p) for v, p in zip(values, self.pools)])

    def feature_scores(self, features: Sequence[np.ndarray]) -> np.ndarray:
        """Raw layer scores M_ℓ (N, L), float64, from already pooled features (N, D_ℓ) per tap."""
        return np.stack([layer.score(f) for f, layer in zip(features, self.layers)], 1)

    def ood_score(self, values: Sequence[np.ndarray]) -> np.ndarray:
        """ood_score (N,), float64; higher = more likely OOD."""
        return self.weights.ood_score(self.layer_scores(values))

    def module(self) -> "ScoreModule":
        """The scoring module, its ``forward`` taking one named argument per tap (``v0, v1, ...``): exporters map
        positional inputs to dynamic-shape specs one by one, which a ``*values`` signature hides."""
        return _with_arity(len(self.taps))(self)


def _with_arity(n: int) -> type:
    names = ", ".join(f"v{i}" for i in range(n))
    namespace: dict[str, Any] = {}
    exec(f"def forward(self, {names}):\n    return self.score({names})\n", namespace)  # noqa: S102 - fixed text
    return type(f"ScoreModule{n}", (ScoreModule,), {"forward": namespace["forward"]})


class ScoreModule(nn.Module):
    """``forward(*tap_values) -> ood_score`` (B,): pooling → per-layer M_ℓ = max_c −‖(f − μ_c)W‖² → −(α·M + α_0).

    Constants are float64 buffers: ``w{ℓ}`` the whitening (D, R), ``m{ℓ}`` the whitened means (K, R), ``alpha``
    (L,), ``bias`` (); ``layer_scores(*tap_values)`` returns M (B, L) for tests and the pre-processing variant."""

    def __init__(self, detector: MahalanobisDetector) -> None:
        super().__init__()
        self.pools = list(detector.pools)
        self.out_dtype = detector.dtype
        for i, layer in enumerate(detector.layers):
            self.register_buffer(f"w{i}", torch.from_numpy(np.ascontiguousarray(layer.whitening)))
            self.register_buffer(f"m{i}", torch.from_numpy(np.ascontiguousarray(layer.means @ layer.whitening)))
        self.register_buffer("alpha", torch.from_numpy(np.asarray(detector.weights.alpha, dtype=np.float64)))
        self.register_buffer("bias", torch.tensor(float(detector.weights.bias), dtype=torch.float64))

    def distances(self, index: int, value: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distances d²_c (B, K), float64, of tap ``index``'s value to every class mean."""
        f = pool_torch(value.to(torch.float64), self.pools[index])
        z = f @ getattr(self, f"w{index}")
        diff = z.unsqueeze(1) - getattr(self, f"m{index}").unsqueeze(0)
        return (diff * diff).sum(-1)

    def layer_scores(self, *values: torch.Tensor) -> torch.Tensor:
        """M (B, L): M_ℓ = max_c −d²_c = −min_c d²_c."""
        return torch.stack([-self.distances(i, x).amin(-1) for i, x in enumerate(values)], dim=1)

    def combine(self, scores: torch.Tensor) -> torch.Tensor:
        """ood_score (B,) in the model's dtype from layer scores M (B, L)."""
        return (-(scores @ self.alpha + self.bias)).to(self.out_dtype)

    def score(self, *values: torch.Tensor) -> torch.Tensor:
        """ood_score (B,) of the tap values, in the model's dtype."""
        return self.combine(self.layer_scores(*values))

    def forward(self, *values: torch.Tensor) -> torch.Tensor:
        return self.score(*values)

"""Feature maps φ for the linear-attention family.

All maps take (B, H, N, D) and return (B, H, N, F) in the same floating dtype; callers pass fp32/fp64 tensors.

- ``elu``: φ(x) = elu(x) + 1, elementwise, F = D, strictly positive (Katharopoulos et al.).
- ``hedgehog``: φ(x) = [softmax(x W_h) ⊕ softmax(−x W_h)] over the feature axis, W_h ∈ R^{D×F'} per head,
  clamped ≥ 1e-12, F = 2F' (LoLCATs ``softmax_dim``). Learnable ``W`` comes from ``params``; the default
  (params absent) is the identity-like init of :func:`init_hedgehog`.
- ``taylor2``: second-order Taylor features with φ(q)·φ(k) = 1 + s q·k + (s q·k)²/2 (F = 1 + D + D²); small D only.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FEATURE_MAPS = ("elu", "hedgehog", "taylor2")
HEDGEHOG_CLAMP = 1e-12


def elu1(x: torch.Tensor) -> torch.Tensor:
    """elu(x) + 1 (strictly positive)."""
    return F.elu(x) + 1.0


def hedgehog(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Hedgehog map. x (B, H, N, D), w (H, D, F') → (B, H, N, 2F'), entries in [1e-12, 1]."""
    y = x @ w.to(x.dtype).unsqueeze(0)
    return torch.cat([torch.softmax(y, -1), torch.softmax(-y, -1)], dim=-1).clamp_min(HEDGEHOG_CLAMP)


def taylor2(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Second-order Taylor features: φ(q)·φ(k) = 1 + t + t²/2 with t = scale·q·k. (B,H,N,D) → (B,H,N,1+D+D²)."""
    xs = x * math.sqrt(scale)
    outer = (xs.unsqueeze(-1) * xs.unsqueeze(-2)).flatten(-2) / math.sqrt(2.0)
    ones = torch.ones_like(x[..., :1])
    return torch.cat([ones, xs, outer], dim=-1)


def init_hedgehog(heads: int, head_dim: int, feature_dim: int = 0) -> torch.Tensor:
    """Identity-like Hedgehog weights (H, D, F'), F' = head_dim when ``feature_dim`` is 0.

    With W = I the map is [softmax(x) ⊕ softmax(−x)], a positive map whose dot products grow with q·k.
    """
    f = feature_dim or head_dim
    eye = torch.eye(head_dim, f, dtype=torch.float32)
    return eye.unsqueeze(0).repeat(heads, 1, 1).contiguous()


def init_feature_params(heads: int, head_dim: int, feature_map: str, feature_dim: int = 0) -> dict[str, torch.Tensor]:
    """Learnable feature-map parameters: separate q and k Hedgehog maps (``fmap_q``, ``fmap_k``), else none."""
    if feature_map == "hedgehog":
        return {"fmap_q": init_hedgehog(heads, head_dim, feature_dim), "fmap_k": init_hedgehog(heads, head_dim, feature_dim)}
    return {}


def feature_map_one(
    x: torch.Tensor,
    *,
    side: str,
    feature_map: str,
    params: dict[str, torch.Tensor] | None,
    scale: float,
    feature_dim: int = 0,
) -> torch.Tensor:
    """φ_q(x) (``side="q"``) or φ_k(x) (``side="k"``) for the named map; ``x`` already in the compute dtype."""
    if feature_map == "elu":
        return elu1(x)
    if feature_map == "hedgehog":
        w = (params or {}).get("fmap_q" if side == "q" else "fmap_k")
        if w is None:
            w = init_hedgehog(x.shape[1], x.shape[-1], feature_dim).to(x.device)
        return hedgehog(x, w)
    if feature_map == "taylor2":
        return taylor2(x, scale)
    raise ValueError(f"unknown feature_map {feature_map!r}; known: {FEATURE_MAPS}")

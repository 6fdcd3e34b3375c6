"""Recurrent (decode) form of causal linear attention: the per-head state after a prefix, and one step.

Causal linear attention y_i = φ(q_i)ᵀ S_i / (φ(q_i)·z_i + ε) with S_i = Σ_{j<=i} φ(k_j) v_jᵀ (F×E per head) and
z_i = Σ_{j<=i} φ(k_j) (F) is an RNN: :func:`prefill_state` gives (S, z) after a prompt (the key side of the
non-causal state, :func:`~passes.attention.linear_core.noncausal_state`), :func:`step` adds one token and reads it
out. The state's size depends on neither the position nor the context length. Feature maps, ε and the q/k
pre-scaling are the ones of :func:`~passes.attention.linear.linear_attention` (same options, same functions), so
prompt + steps equal the full causal output. States are kept in the compute dtype (fp32, fp64 for fp64 inputs).

Shapes: q, k, v (B, H, 1, D) for one token (B, H, N, D) for a prompt; S (B, H, F, E); z (B, H, F, 1).
"""
from __future__ import annotations

from typing import Any

import torch

from .linear import feature_map_side
from .linear_core import noncausal_state
from .masks import compute_dtype


def _fmap_kwargs(scale: float, params: dict[str, torch.Tensor] | None, feature_map: str, feature_dim: int,
                 scale_qk: bool) -> dict[str, Any]:
    return dict(scale=scale, params=params, feature_map=feature_map, feature_dim=feature_dim, scale_qk=scale_qk)


def prefill_state(
    k: torch.Tensor, v: torch.Tensor, *, scale: float, params: dict[str, torch.Tensor] | None = None,
    feature_map: str = "elu", feature_dim: int = 0, scale_qk: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, z) after the prompt keys/values k, v (B, H, N, D): S = Σ φ(k_j) v_jᵀ, z = Σ φ(k_j) (as a column)."""
    cd = compute_dtype(k)
    fk = feature_map_side(k, "k", cd, **_fmap_kwargs(scale, params, feature_map, feature_dim, scale_qk))
    return noncausal_state(fk, v.to(cd))


def step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor, z: torch.Tensor, *, scale: float,
    params: dict[str, torch.Tensor] | None = None, eps: float = 1e-6, feature_map: str = "elu",
    feature_dim: int = 0, scale_qk: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode step for new tokens q, k, v (B, H, 1, D) given the state (S, z) of all earlier tokens:
    (y (B, H, 1, E) in q's dtype, S', z'). The new token sees itself (causal j <= i), so the state is updated
    before the read-out. O(F·E) per head, independent of the position."""
    cd = compute_dtype(q)
    kw = _fmap_kwargs(scale, params, feature_map, feature_dim, scale_qk)
    fq = feature_map_side(q, "q", cd, **kw)
    ds, dz = prefill_state(k, v, **kw)  # one token: φ(k) vᵀ and φ(k), the same formula as the prompt's state
    state, z = state + ds, z + dz
    return ((fq @ state) / (fq @ z + eps)).to(q.dtype), state, z


class LinearStep(torch.nn.Module):
    """:func:`step` as a module (for export as a standalone ONNX / torch.export step graph): forward(q, k, v, S,
    z) → (y, S', z') with the variant options fixed at construction."""

    def __init__(self, *, scale: float, params: dict[str, torch.Tensor] | None = None, **options: Any):
        super().__init__()
        self.scale, self.options = scale, options
        self.params = params

    def forward(self, q, k, v, state, z):
        return step(q, k, v, state, z, scale=self.scale, params=self.params, **self.options)

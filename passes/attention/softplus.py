"""Softplus attention LSSA and its re-weighting LSSAR (Gao, Spratling et al.,
arXiv 2501.13428 — the whole formula is from secondary sources, unverified against the official code).

LSSA: q̂ = q/‖q‖, k̂ = k/‖k‖, A_ij = M_ij Softplus(τ · ln d · ln n_i · q̂_i·k̂_j), A_i ← A_i/‖A_i‖₁, y = AV.
n_i is the visible-key count from the mask (= i for unpadded causal rows). ``scale`` is unused (cosine logits).
τ = 1 unless params give a per-head ``log_temp`` (τ = exp(log_temp)).

LSSAR (``reweight=True``, power ``p``): x_ij = M_ij ReLU(n_i A_ij − o_i), o_i = 0 when n_i <= 3 (the first three
causal rows) else 1; A_ij = x_ij^p / Σ_l x_il^p evaluated overflow-free as x̂ = x / max_l x_il (so x̂ ∈ [0, 1] and
the row max contributes 1 to the sum); a row whose x is all zero falls back to uniform over its visible keys.
Everything runs in fp32 (fp64 for fp64 inputs). An arbitrary mask contributes its keep part only.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from .base import AttentionVariant, VariantOption
from .masks import compute_dtype, keep_mask, mask_checked, visible_counts

#: "boolean": arbitrary keep/drop masks (exact O(N²) fallback); additive biases are not expressible here.
MASK_KINDS = frozenset({"none", "causal", "key_padding", "boolean"})
NORM_EPS = 1e-12

OPTIONS = (
    VariantOption("reweight", False, bool, "apply the LSSAR power re-weighting (for LSSA-trained models)"),
    VariantOption("p", 15.0, float, "LSSAR power (3 best at the training length, 15 at >= 8K per the paper)",
                  minimum=0.0, exclusive=True),
)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum(-1, keepdim=True)).clamp_min(NORM_EPS)


def lssa_weights(q, k, *, keep, params, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row-normalised LSSA weights (B,H,S,T), n_i (…,S,1)); q, k in the compute dtype."""
    cd = q.dtype
    t_len, d = k.shape[-2], q.shape[-1]
    n = visible_counts(keep, t_len, cd)
    cos = _unit(q) @ _unit(k).transpose(-1, -2)
    arg = cos * (math.log(d) * torch.log(n.clamp_min(1.0)))
    p = params or {}
    if p.get("log_temp") is not None:
        arg = arg * torch.exp(p["log_temp"].to(cd)).reshape(1, heads, 1, 1)
    a = F.softplus(arg)
    if keep is not None:
        a = a * keep.to(cd)
    s = a.sum(-1, keepdim=True)
    return a / torch.where(s > 0, s, torch.ones_like(s)), n


def lssar_reweight(a: torch.Tensor, n: torch.Tensor, keep: torch.Tensor | None, power: float) -> torch.Tensor:
    """Re-weight row-normalised weights ``a`` with power ``power`` (max-rescaled, overflow-free)."""
    cd = a.dtype
    offset = (n > 3.0).to(cd)
    x = torch.relu(n * a - offset)
    if keep is not None:
        x = x * keep.to(cd)
    xmax = x.amax(-1, keepdim=True)
    has = xmax > 0
    xh = x / torch.where(has, xmax, torch.ones_like(xmax))
    pw = torch.pow(xh, power)
    rew = pw / torch.where(has, pw.sum(-1, keepdim=True), torch.ones_like(xmax))
    if keep is None:
        uniform = torch.ones_like(a) / n.clamp_min(1.0)
    else:
        uniform = keep.to(cd) / n.clamp_min(1.0)
    return torch.where(has, rew, uniform)


def softplus_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool = False,
    key_padding: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    params: dict[str, torch.Tensor] | None = None,
    reweight: bool = False,
    p: float = 15.0,
) -> torch.Tensor:
    """LSSA / LSSAR, (B,H,S,Dv) in q's dtype. ``scale`` is accepted for the contract and unused."""
    del scale
    cd = compute_dtype(q)
    s_len, t_len = q.shape[-2], k.shape[-2]
    keep = keep_mask(s_len, t_len, causal=causal, key_padding=key_padding, attn_mask=attn_mask, device=q.device)
    a, n = lssa_weights(q.to(cd), k.to(cd), keep=keep, params=params, heads=q.shape[1])
    if reweight:
        a = lssar_reweight(a, n, keep, float(p))
    return (a @ v.to(cd)).to(q.dtype)


def init_params(heads: int, head_dim: int, options: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Per-head ``log_temp`` (H,) = 0 (τ = 1): equal to the parameter-free form."""
    return {"log_temp": torch.zeros(heads, dtype=torch.float32)}


SOFTPLUS = AttentionVariant(
    name="softplus",
    fn=mask_checked("softplus", MASK_KINDS, softplus_attention),
    mask_kinds=MASK_KINDS,
    options=OPTIONS,
    init_params=init_params,
    description="softplus attention LSSA (+ LSSAR re-weighting) (Gao, Spratling et al.; secondary sources)",
    extra={"unverified": True, "learnable": ("log_temp",)},
)

"""Sigmoid attention (Ramapuram et al., ICLR 2025).

Y = (σ(τ·(s·QKᵀ + B_mask) + b) ⊙ M) V with no row normalisation. b is a constant fixed at conversion:
b = −ln n_ref (option ``n_ref``; unset, the converting pass takes the model's ``max_position_embeddings`` from its
config, else 2048). Never
derived from the call-time key length (prefill and cached decode would disagree). τ = 1 unless params give a
per-head ``log_temp`` (τ = exp(log_temp)); params may also override b per head (``bias``). The keep mask multiplies
σ, so masked weights are exactly 0 and no −inf/finfo.min value reaches arithmetic (no NaN in fp16/bf16).
Optional length normalisation (``length_norm``): row i multiplied by 1/n_i or 1/√n_i, n_i = visible keys.
Everything runs in fp32 (fp64 for fp64 inputs). The exported graph contains no Softmax node.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from .base import AttentionVariant, VariantOption
from .masks import compute_dtype, keep_mask, mask_checked, split_attn_mask, visible_counts

MASK_KINDS = frozenset({"none", "causal", "key_padding", "arbitrary"})
LENGTH_NORMS = ("none", "n", "sqrt_n")

#: n_ref when neither the option nor the model's config gives one.
DEFAULT_N_REF = 2048

OPTIONS = (
    VariantOption("n_ref", None, int, "reference (training) context; fixed bias b = −ln n_ref (default: the "
                  "model config's max_position_embeddings, else 2048)", minimum=1),
    VariantOption("length_norm", "none", str, "none, n (×1/n_i) or sqrt_n (×1/√n_i) row scaling",
                  choices=("none", "n", "sqrt_n")),
)


def sigmoid_bias(n_ref: int) -> float:
    """b = −ln n_ref (−7.6246 for 2048): a row of n_ref zero logits then sums to n_ref/(n_ref+1)."""
    if n_ref < 1:
        raise ValueError(f"n_ref must be >= 1, got {n_ref}")
    return -math.log(n_ref)


def sigmoid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool = False,
    key_padding: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    params: dict[str, torch.Tensor] | None = None,
    n_ref: int | None = None,
    length_norm: str = "none",
) -> torch.Tensor:
    """Sigmoid attention, (B,H,S,Dv) in q's dtype."""
    if length_norm not in LENGTH_NORMS:
        raise ValueError(f"unknown length_norm {length_norm!r}; known: {LENGTH_NORMS}")
    cd = compute_dtype(q)
    s_len, t_len = q.shape[-2], k.shape[-2]
    heads = q.shape[1]
    logits = (q.to(cd) @ k.to(cd).transpose(-1, -2)) * scale
    if attn_mask is not None:
        bias_mask = split_attn_mask(attn_mask, cd)[1]
        if bias_mask is not None:
            logits = logits + bias_mask
    p = params or {}
    if p.get("log_temp") is not None:
        logits = logits * torch.exp(p["log_temp"].to(cd)).reshape(1, heads, 1, 1)
    if p.get("bias") is not None:
        logits = logits + p["bias"].to(cd).reshape(1, heads, 1, 1)
    else:
        logits = logits + sigmoid_bias(DEFAULT_N_REF if n_ref is None else n_ref)
    w = torch.sigmoid(logits)
    keep = keep_mask(s_len, t_len, causal=causal, key_padding=key_padding, attn_mask=attn_mask, device=q.device)
    if keep is not None:
        w = w * keep.to(cd)
    if length_norm != "none":
        n = visible_counts(keep, t_len, cd).clamp_min(1.0)
        w = w / (n if length_norm == "n" else torch.sqrt(n))
    return (w @ v.to(cd)).to(q.dtype)


def init_params(heads: int, head_dim: int, options: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Per-head ``bias`` (H,) = −ln n_ref and ``log_temp`` (H,) = 0: equal to the parameter-free form."""
    n_ref = int(options.get("n_ref") or DEFAULT_N_REF)
    return {
        "bias": torch.full((heads,), sigmoid_bias(n_ref), dtype=torch.float32),
        "log_temp": torch.zeros(heads, dtype=torch.float32),
    }


SIGMOID = AttentionVariant(
    name="sigmoid",
    fn=mask_checked("sigmoid", MASK_KINDS, sigmoid_attention),
    mask_kinds=MASK_KINDS,
    options=OPTIONS,
    init_params=init_params,
    description="sigmoid attention σ(s·qkᵀ + b), b = −ln n_ref fixed at conversion (Ramapuram et al. 2025)",
    extra={"learnable": ("bias", "log_temp")},
)

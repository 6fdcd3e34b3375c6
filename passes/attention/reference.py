"""Exact softmax attention, the canonical form every replacement is compared with (spec/attention.md §0).

y_i = Σ_j M_ij exp(s q_i·k_j + b_ij) v_j / Σ_j M_ij exp(s q_i·k_j + b_ij), computed in fp32 (fp64 for fp64 inputs).
Fully masked rows give 0 (never NaN).
"""
from __future__ import annotations

from typing import Any

import torch

from .base import AttentionVariant
from .masks import compute_dtype, keep_mask, mask_checked, split_attn_mask

MASK_KINDS = frozenset({"none", "causal", "key_padding", "arbitrary"})


def masked_softmax(logits: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last axis restricted to ``keep``; rows with no kept entry are all 0.

    ``logits`` must be finite. The row max is taken over kept entries only, so dropped entries never influence
    the result, and the exponentials of kept entries are <= 1.
    """
    if keep is None:
        m = logits.amax(-1, keepdim=True)
        e = torch.exp(logits - m)
        return e / e.sum(-1, keepdim=True)
    low = torch.finfo(logits.dtype).min
    masked = torch.where(keep, logits, torch.full((), low, dtype=logits.dtype, device=logits.device))
    m = masked.amax(-1, keepdim=True)
    e = torch.exp(masked - m) * keep.to(logits.dtype)
    den = e.sum(-1, keepdim=True)
    return e / torch.where(den > 0, den, torch.ones_like(den))


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool = False,
    key_padding: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    params: dict[str, torch.Tensor] | None = None,
    **options: Any,
) -> torch.Tensor:
    """Exact softmax attention (B, H, S, Dv) in q's dtype; supports every mask kind. ``params`` is ignored."""
    if options:
        raise TypeError(f"reference attention takes no options, got {sorted(options)}")
    cd = compute_dtype(q)
    s_len, t_len = q.shape[-2], k.shape[-2]
    logits = (q.to(cd) @ k.to(cd).transpose(-1, -2)) * scale
    if attn_mask is not None:
        bias = split_attn_mask(attn_mask, cd)[1]
        if bias is not None:
            logits = logits + bias
    keep = keep_mask(s_len, t_len, causal=causal, key_padding=key_padding, attn_mask=attn_mask, device=q.device)
    w = masked_softmax(logits, keep)
    return (w @ v.to(cd)).to(q.dtype)


REFERENCE = AttentionVariant(
    name="reference",
    fn=mask_checked("reference", MASK_KINDS, reference_attention),
    mask_kinds=MASK_KINDS,
    options=(),
    init_params=lambda heads, head_dim, options: {},
    description="exact softmax attention (canonical form; fully masked rows give 0)",
)

"""Exact softmax attention, the canonical form every replacement is compared with: the engine's formula
(:func:`rewrite.attention_math.softmax_attention`, bottom-right aligned causal, fully masked rows give 0) behind
the variant contract of :mod:`passes.attention.base`.
"""
from __future__ import annotations

from typing import Any

import torch

from rewrite.attention_math import softmax_attention

from .base import AttentionVariant
from .masks import mask_checked

MASK_KINDS = frozenset({"none", "causal", "key_padding", "arbitrary"})


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
    return softmax_attention(q, k, v, scale=scale, causal=causal, key_padding=key_padding, attn_mask=attn_mask)


REFERENCE = AttentionVariant(
    name="reference",
    fn=mask_checked("reference", MASK_KINDS, reference_attention),
    mask_kinds=MASK_KINDS,
    options=(),
    init_params=lambda heads, head_dim, options: {},
    description="exact softmax attention (canonical form; fully masked rows give 0)",
)

"""Softmax-attention replacements. Each module exports one :class:`AttentionVariant`.

``VARIANTS`` maps the variant name to its descriptor; :func:`get_variant` looks one up.
"""
from __future__ import annotations

from .base import MASK_KINDS, AttentionVariant, VariantOption
from .linear import LINEAR, linear_attention
from .mala import MALA, mala_attention
from .reference import REFERENCE, reference_attention
from .sigmoid import SIGMOID, sigmoid_attention
from .soft import SOFT, soft_attention
from .softplus import SOFTPLUS, softplus_attention

VARIANTS: dict[str, AttentionVariant] = {
    v.name: v for v in (REFERENCE, LINEAR, MALA, SIGMOID, SOFTPLUS, SOFT)
}


def get_variant(name: str) -> AttentionVariant:
    """The variant called ``name``; ``KeyError`` listing the known names otherwise."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise KeyError(f"unknown attention variant {name!r}; known: {sorted(VARIANTS)}") from None


__all__ = [
    "MASK_KINDS",
    "AttentionVariant",
    "VariantOption",
    "VARIANTS",
    "get_variant",
    "reference_attention",
    "linear_attention",
    "mala_attention",
    "sigmoid_attention",
    "softplus_attention",
    "soft_attention",
]

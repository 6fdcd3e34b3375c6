"""The variant contract, defined by the engine (:mod:`rewrite.variant`) and re-exported for the catalogue."""
from rewrite.variant import MASK_KINDS, AttentionVariant, VariantOption

__all__ = ["MASK_KINDS", "AttentionVariant", "VariantOption"]
